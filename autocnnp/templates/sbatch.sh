#!/bin/bash
# Slurm batch script for the autocnnp job ${job}
# rendered by `autocnnp submit` from templates/sbatch.sh (a Python string.Template). Inside the
# allocation run & manage starts the ${ntasks} ranks with ${launcher} and watches them; outputs go
# to ${output}. Slurm's warning before the time limit (SIGUSR1) makes the ranks stop at the end of
# an epoch with a checkpoint (exit ${stopped}); with requeue the job then queues itself again and resumes.
${directives}

# the exit code outlives the controller's memory of the job (clusters without accounting)
record_exit() { mkdir -p ${exit_dir} && echo "$$1" > ${exit_dir}/"$$SLURM_JOB_ID".exit; }
setup_failed() {
  echo "autocnnp: setup line $$1 failed (exit code $$2), training not started: $$3" >&2
  record_exit ${bad_input}
  exit ${bad_input}
}
# setup lines (<property name="setup">): one command each; the first that fails ends the job
${setup}
set -u
echo "autocnnp: Slurm job $$SLURM_JOB_ID on $$SLURM_JOB_NODELIST: ${ntasks} ranks on ${nodes} node(s), launcher ${launcher}"
${python} -m autocnnp run --launcher ${launcher}${sets} ${job} &
pid=$$!
# pass the time-limit warning and the signals that stop the job on to run & manage, which stops its ranks
trap 'kill -USR1 "$$pid" 2>/dev/null' USR1
trap 'kill -TERM "$$pid" 2>/dev/null' TERM INT HUP
status=0
while kill -0 "$$pid" 2>/dev/null; do
  wait "$$pid"
  status=$$?
done
record_exit "$$status"
if [ "$$status" = ${stopped} ] && ${requeue}; then
  echo "autocnnp: stopped with a checkpoint before the time limit; requeueing Slurm job $$SLURM_JOB_ID to resume"
  scontrol requeue "$$SLURM_JOB_ID"
fi
exit "$$status"
