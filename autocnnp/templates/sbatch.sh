#!/bin/bash
# Slurm batch script for the autocnnp job ${job}
# rendered by `autocnnp submit` from templates/sbatch.sh (a Python string.Template). Inside the
# allocation run & manage starts the ${ntasks} ranks with ${launcher} and watches them; outputs go
# to ${output}.
${directives}

set -u
echo "autocnnp: Slurm job $$SLURM_JOB_ID on $$SLURM_JOB_NODELIST: ${ntasks} ranks on ${nodes} node(s), launcher ${launcher}"
${python} -m autocnnp run --launcher ${launcher}${sets} ${job}
status=$$?
# the exit code outlives the controller's memory of the job (clusters without accounting)
mkdir -p ${exit_dir} && echo "$$status" > ${exit_dir}/"$$SLURM_JOB_ID".exit
exit "$$status"
