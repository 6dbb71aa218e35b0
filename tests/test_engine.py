"""The engine refuses every kind of bad job with ONE located, hinted paragraph and exit code 2, and
starts nothing; good jobs (built-in names, user files, plug-ins, entry points) assemble."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import PLUGINS, line_of

from autocnnp.core.errors import JobError
from autocnnp.engine.xmlparse import MAX_JOB_BYTES
from autocnnp.generator.assemble import assemble
from autocnnp.generator.points import POINTS, registry
from autocnnp.generator.registry import Entry
from autocnnp.run.job import load_job

XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'
ENV_MODULE = '<module name="train_env_def">'
STRATEGY = '<action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>'
PLACEMENT = '<action class="non_extensible" type="device_placement"><value>local_rank</value></action>'
MEMORY = '<action class="non_extensible" type="memory_allocation"><value>soft_placement</value></action>'
CHECKPOINT = '<value name="every_epochs">1</value>'
ARCH_UNET = ('<CNN_archi name="unet">\n      <param name="depth">3</param>\n'
             '      <param name="base_channels">16</param>\n    </CNN_archi>')
DATA_SYNTHETIC = ('<data format="synthetic">\n      <param name="kind">brain</param>\n'
                  '      <param name="train_samples">32</param>\n      <param name="valid_samples">8</param>\n'
                  '      <param name="size">32</param>\n    </data>')
HYPER_END = "</hyperparameters>"


@pytest.fixture
def refused(cli, monkeypatch):
    """``refused(path, line_or_needle, *parts, file=None)``: `validate` and `run` both exit 2 with the same
    single-paragraph ``file:line:col: problem. Hint: fix.`` message naming every part, and nothing starts."""
    import autocnnp.run.launch as launch

    def no_start(*args, **kwargs):
        raise AssertionError("a refused job must start nothing")

    monkeypatch.setattr(launch, "run", no_start)
    monkeypatch.setattr(subprocess, "run", no_start)
    monkeypatch.setattr(subprocess, "Popen", no_start)

    def check(path, line, *parts, file=None):
        line = line_of(path, line) if isinstance(line, str) else line
        rc, out, err = cli("validate", path)
        assert rc == 2, err
        assert out == ""
        assert err.endswith("\n") and err.count("\n") == 1, f"not one paragraph: {err!r}"
        msg = err.rstrip("\n")
        where = re.escape(str((file or path).resolve()))
        assert re.match(rf"autocnnp: {where}:{line}:\d+: \S", msg), f"expected {file or path}:{line}: in {msg}"
        assert " Hint: " in msg and not msg.endswith(" Hint: ."), msg
        for part in parts:
            assert part in msg, f"{part!r} not in {msg}"
        assert cli("run", path) == (2, "", err)
        return msg

    return check


@contextlib.contextmanager
def registered(point_type, name, target="autocnnp_nowhere:Nothing", **kw):
    """A fake built-in of ``point_type`` for one test."""
    reg = registry(point_type)
    reg.extra[name] = Entry(name, target, **kw)
    try:
        yield
    finally:
        del reg.extra[name]


def copy_plugin(name, folder):
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(PLUGINS / name, folder / name)


# ---- malformed XML, schema ----------------------------------------------------------------------


def test_malformed_xml(job, refused):
    path = job(("</CNN_archi>", "</CNN_arch>"))
    refused(path, "</CNN_arch>", "malformed XML", "CNN_archi", "Hint: fix the markup")


def test_malformed_xml_column_points_at_the_offending_character(job, refused):
    path = job(("<seed>0</seed>", "<seed x=1>0</seed>"))
    column = path.read_text().splitlines()[line_of(path, "x=1") - 1].index("x=1") + 3  # 1-based, at the '1'
    msg = refused(path, "x=1", "malformed XML")
    assert f":{line_of(path, 'x=1')}:{column}: " in msg


@pytest.mark.parametrize("encoding", ["latin-1", "latin1", "ISO-8859-1", "iso8859_15", "utf_8", "u8", "cp1252",
                                      "mac-roman", "euc_jp"])
def test_every_python_name_of_a_supported_encoding_is_accepted(job, cli, encoding):
    """Python's codecs and libxml2 spell encodings differently (latin-1 / ISO-8859-1); either name works."""
    from autocnnp.engine.job import read_job

    path = job((XML_DECL, XML_DECL.replace("UTF-8", encoding) + "\n<!-- r\u00e9seau -->"))
    path.write_bytes(path.read_text().encode(encoding))
    rc, out, err = cli("validate", path)
    assert rc == 0, err
    assert "r\u00e9seau" in read_job(path).text


def test_encoding_neither_python_nor_libxml2_knows_is_refused_with_a_fix(job, refused):
    path = job((XML_DECL, XML_DECL.replace("UTF-8", "latin-9x")))
    refused(path, 1, "Unsupported encoding: latin-9x", 'Hint: save the file as UTF-8 and declare encoding="UTF-8"')


def test_empty_file(job, refused):
    refused(job(text=""), 1, "malformed XML")


def test_schema_unknown_element(job, refused):
    path = job(("<seed>0</seed>", "<seed>0</seed>\n    <bogus/>"))
    refused(path, "<bogus/>", "<bogus> is not allowed", "Hint: allowed here:", "CNN_archi")


def test_schema_missing_required_element_names_only_required_ones(job, refused):
    path = job(("<seed>0</seed>", ""), (ARCH_UNET, ""))
    msg = refused(path, "<task", "<task> lacks CNN_archi.", "Hint: add <CNN_archi>")
    assert "seed" not in msg and "monitoring" not in msg


def test_schema_bad_class_and_missing_attribute(job, refused):
    path = job(('class="extensible" type="dist_strategy"', 'class="ext" type="dist_strategy"'))
    refused(path, 'class="ext"', "'ext'", 'Hint: use class="extensible" or class="non_extensible"')
    path = job(('class="extensible" type="dist_strategy"', 'class="extensible"'))
    refused(path, STRATEGY.replace(' type="dist_strategy"', ""), 'needs the attribute type="..."')


def test_schema_unknown_attribute(job, refused):
    path = job(('<task name="imaging_segmentation">', '<task name="imaging_segmentation" gpus="2">'))
    refused(path, "<task ", "gpus", "Hint: remove that attribute")


def test_not_a_job_file(job, refused):
    refused(job(text=XML_DECL + "\n<foo/>\n"), 2, "foo")


def test_missing_job_file(tmp_path, refused):
    refused(tmp_path / "nope.xml", 0, "cannot read the job file", "autocnnp new")


# ---- XXE, billion laughs, oversize --------------------------------------------------------------

XXE = '<!DOCTYPE system_config [\n  <!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>'
LAUGHS = ('<!DOCTYPE lolz [\n  <!ENTITY lol0 "lol">\n'
          + "".join(f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">\n' for i in range(1, 10)) + "]>")


def test_xxe_refused(job, refused):
    path = job((XML_DECL, XML_DECL + "\n" + XXE), ("<seed>0</seed>", "<seed>&xxe;</seed>"))
    msg = refused(path, "<!DOCTYPE", "document type and entity declarations are refused",
                  "Hint: remove the <!DOCTYPE")
    assert "root:" not in msg


def test_billion_laughs_refused_quickly(job, refused):
    path = job((XML_DECL, XML_DECL + "\n" + LAUGHS), ("<seed>0</seed>", "<seed>&lol9;</seed>"))
    start = time.perf_counter()
    refused(path, "<!DOCTYPE", "entity declarations are refused")
    assert time.perf_counter() - start < 2


def test_lowercase_doctype_refused(job, refused):
    path = job((XML_DECL, XML_DECL + "\n<!doctype system_config>"))
    refused(path, "<!doctype", "entity declarations are refused")


def test_dtd_in_utf16_refused(tmp_path, refused):
    """The byte scan cannot see UTF-16 markup; the parsed document's DTD is refused all the same."""
    path = tmp_path / "job16.xml"
    body = '<system_config><task name="x">&xxe;</task></system_config>'
    text = f"{XML_DECL.replace('UTF-8', 'UTF-16')}\n{XXE}\n{body}\n"
    path.write_bytes(text.encode("utf-16"))
    refused(path, 2, "entity declarations are refused")


def test_billion_laughs_in_utf16_refused_quickly(tmp_path, cli):
    path = tmp_path / "laughs16.xml"
    body = '<system_config><task name="x">&lol9;</task></system_config>'
    text = f"{XML_DECL.replace('UTF-8', 'UTF-16')}\n{LAUGHS}\n{body}\n"
    path.write_bytes(text.encode("utf-16"))
    start = time.perf_counter()
    rc, out, err = cli("validate", path)
    assert time.perf_counter() - start < 2
    # refused by the DTD check or by libxml2's entity-amplification guard, as one located paragraph
    assert (rc, out, err.count("\n")) == (2, "", 1) and f"{path}:" in err and " Hint: " in err, err


def test_oversize_file_refused(job, refused):
    pad = "<!--" + "x" * MAX_JOB_BYTES + "-->\n"
    path = job(("<system_config>", pad + "<system_config>"))
    refused(path, 0, f"over the {MAX_JOB_BYTES}-byte limit", "Hint:")


def test_exactly_one_mib_is_accepted(job, cli):
    path = job()
    size = path.stat().st_size
    pad = "<!--" + "x" * (MAX_JOB_BYTES - size - len("<!---->\n")) + "-->\n"
    path = job(("<system_config>", pad + "<system_config>"))
    assert path.stat().st_size == MAX_JOB_BYTES
    assert cli("validate", path)[0] == 0


# ---- input sizes: what the data gives and the architecture takes ---------------------------------------


FRAMEWORK_TF = '<action class="non_extensible" type="framework"><value>tensorflow</value></action>'


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_input_size_the_network_cannot_take_is_refused_naming_the_nearest(job, refused, framework):
    """A depth-3 U-Net halves its inputs twice: 30 px slices are refused before anything starts, on either
    framework, naming the rule and the nearest sizes that work."""
    edits = [('<param name="size">32</param>', '<param name="size">30</param>')]
    if framework == "tensorflow":
        edits.append((ENV_MODULE, ENV_MODULE + FRAMEWORK_TF))
    path = job(*edits)
    refused(path, '<param name="size">30', "architecture 'unet' (depth=3", "multiples of 4",
            "the data's inputs are 30x30", "28 or 32 instead of 30")


def test_input_size_set_on_the_command_line_is_refused_there(job, cli):
    rc, out, err = cli("validate", job(), "--set", "data.size=30")
    assert (rc, out, err.count("\n")) == (2, "", 1), err
    assert err.startswith("autocnnp: --set data.size=30: ") and "28 or 32 instead of 30" in err, err
    assert cli("validate", job(), "--set", "data.size=28")[0] == 0


def test_a_3d_network_on_2d_slices_is_refused(job, refused):
    path = job((ARCH_UNET, '<CNN_archi name="unet3d"><param name="depth">3</param></CNN_archi>'))
    refused(path, "<CNN_archi", "architecture 'unet3d' takes 3D inputs, but the data's inputs are 2D (32x32)",
            "choose unet3d or resunet3d")


def test_a_3d_network_on_tensorflow_is_refused(job, refused, tmp_path):
    """3D trains on torch only: a network declaring 3D inputs is refused on tensorflow, at validate."""
    (tmp_path / "net.py").write_text(SIZED_NET.format(rule='{"multiple": 4, "dimensions": 3}'))
    path = job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"), (ENV_MODULE, ENV_MODULE + FRAMEWORK_TF))
    refused(path, "<CNN_archi", "architecture 'build' (3D) trains on the torch framework only; this job trains "
            "with tensorflow")


def test_architecture_parameters_that_change_the_rule_are_checked_too(job, refused):
    path = job(('<param name="depth">3</param>', '<param name="depth">7</param>'))
    refused(path, '<param name="size">32', "multiples of 64", "64 instead of 32")


def test_fcn_takes_multiples_of_32(job, refused):
    path = job((ARCH_UNET, '<CNN_archi name="fcn"><param name="width">0.05</param></CNN_archi>'),
               ('<param name="size">32</param>', '<param name="size">48</param>'))
    refused(path, '<param name="size">48', "architecture 'fcn' (width=0.05)", "multiples of 32", "32 or 64 instead of 48")


def test_a_slice_cache_is_checked_at_the_size_it_was_built_with(job, refused, tmp_path):
    """A decathlon job reading a slice cache (autocnnp preprocess --size 30) gets its slices at the cache's size,
    whatever its own size says; validate reads it from the cache's meta.json."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text('{"format": 2, "size": [30, 36], "channels": 1}')
    path = job((DATA_SYNTHETIC, '<data format="decathlon">\n      <train><path>cache</path></train>\n    </data>'))
    refused(path, "<CNN_archi", "multiples of 4", "the data's inputs are 30x36", "28 or 32 instead of 30")


SIZED_NET = """import torch


input_sizes = {rule}


def build(in_channels, num_classes):
    return torch.nn.Conv2d(in_channels, num_classes, 1)
"""


def test_user_architecture_declares_its_size_rule(job, cli, refused, tmp_path):
    """A .py architecture declares its rule as a literal (read, not run: validate imports no torch)."""
    (tmp_path / "net.py").write_text(SIZED_NET.format(rule='{"multiple": 16, "minimum": 48}'))
    path = job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"))
    refused(path, '<param name="size">32', "takes input sides that are multiples of 16 and at least 48",
            "48 instead of 32")
    path = job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"),
               ('<param name="size">32</param>', '<param name="size">64</param>'))
    assert cli("validate", path)[0] == 0
    (tmp_path / "net.py").write_text(SIZED_NET.format(rule="None").replace("input_sizes = None", ""))
    assert cli("validate", job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"),
                               ('<param name="size">32</param>', '<param name="size">31</param>')))[0] == 0


def test_user_architecture_size_rule_that_is_no_literal_is_refused(job, refused, tmp_path):
    (tmp_path / "net.py").write_text(SIZED_NET.format(rule="2 ** 4"))
    path = job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"))
    refused(path, "<CNN_archi><path>net.py", "input_sizes = '2 ** 4' is no size rule", "Hint: fix input_sizes")


# ---- names: modules, actions, implementations ("did you mean") ------------------------------------


def test_unknown_module(job, refused):
    path = job((ENV_MODULE, '<module name="train_env_deff">'))
    refused(path, "train_env_deff", "unknown module 'train_env_deff'", "Hint: did you mean 'train_env_def'")


def test_thesis_module_spelling_train_srategy_def_accepted(job, cli):
    path = job(('<module name="train_strategy_def">', '<module name="train_srategy_def">'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "Training Strategy Tuning (module train_strategy_def)" in out
    assert "- dist_strategy [extensible] = ring_allreduce  (built-in)\n" in out


def test_unknown_action_type(job, refused):
    path = job(('type="memory_allocation"', 'type="memory_alocation"'))
    refused(path, "memory_alocation", "unknown action type 'memory_alocation'",
            "Hint: did you mean 'memory_allocation'?")


def test_unknown_strategy(job, refused):
    path = job(("<value>ring_allreduce</value>", "<value>ring_allreduse</value>"))
    refused(path, "ring_allreduse", "unknown dist_strategy 'ring_allreduse'", "Hint: did you mean 'ring_allreduce'?")


def test_unknown_name_far_from_any_lists_the_choices(job, refused):
    path = job(("<value>ring_allreduce</value>", "<value>zzz</value>"))
    refused(path, "zzz", "unknown dist_strategy 'zzz'", "Hint: valid choices are ", "'ring_allreduce'")


def test_unknown_architecture(job, refused):
    path = job(('<CNN_archi name="unet">', '<CNN_archi name="unett">'))
    refused(path, "unett", "unknown architecture 'unett'", "Hint: did you mean 'unet' or 'unet3d'?")


def test_unknown_data_format_and_lr_policy(job, refused):
    refused(job(('format="synthetic"', 'format="synthetc"')), "synthetc", "unknown dataset 'synthetc'",
            "did you mean 'synthetic'?")
    refused(job(("<value>gradual_warmup</value>", "<value>gradual_warmpu</value>")), "gradual_warmpu",
            "unknown lr_policy 'gradual_warmpu'", "did you mean 'gradual_warmup'")


def test_action_in_wrong_module_and_action_set_elsewhere(job, refused):
    path = job((STRATEGY, ""), (PLACEMENT, PLACEMENT + "\n" + STRATEGY))
    refused(path, "dist_strategy", "does not belong to module 'train_env_def'",
            'Hint: move it into <module name="train_strategy_def">')
    path = job((PLACEMENT, PLACEMENT + '\n<action class="non_extensible" type="architecture"><value>fcn</value>'
                           "</action>"))
    refused(path, 'type="architecture"', "is not set by an <action>", "Hint: use <CNN_archi>")


def test_unknown_action_parameter_and_parameter_on_parameterless(job, refused):
    path = job((STRATEGY, STRATEGY.replace("</value>", '</value><value name="bucket_cap">5</value>')))
    refused(path, "bucket_cap", "has no parameter 'bucket_cap'", "did you mean 'bucket_cap_mb'?")
    path = job((PLACEMENT, PLACEMENT.replace("</value>", '</value><value name="gpus">2</value>')))
    refused(path, 'name="gpus"', "takes no parameters, but 'gpus' is given", "Hint: remove it")


def test_value_with_text_and_path_and_empty_value(job, refused):
    path = job(("<value>ring_allreduce</value>", "<value>ring_allreduce<path>x.py</path></value>"))
    refused(path, "x.py", "holds both text and a <path>")
    refused(job(("<value>ring_allreduce</value>", "<value> </value>")), "<value> </value>", "empty <value>")


def test_architecture_needs_exactly_one_of_name_and_path(job, refused):
    refused(job(('<CNN_archi name="unet">', "<CNN_archi>")), "<CNN_archi>", "names no architecture",
            'Hint: add name="unet"')
    refused(job(('<CNN_archi name="unet">', '<CNN_archi name="unet"><path>n.py</path>')), "<CNN_archi",
            "has both name= and <path>")


# ---- missing files ----------------------------------------------------------------------------------


def test_missing_architecture_file(job, refused, tmp_path):
    path = job((ARCH_UNET, "<CNN_archi><path>nets/missing_net.py</path></CNN_archi>"))
    refused(path, "<CNN_archi>", f"the architecture file {tmp_path / 'nets' / 'missing_net.py'} does not exist",
            "relative paths are read from the job file's folder")


def test_architecture_file_not_python(job, refused):
    refused(job((ARCH_UNET, "<CNN_archi><path>model.onnx</path></CNN_archi>")), "<CNN_archi>",
            "model.onnx is not a Python file or a Keras model", "Hint:")


def test_missing_or_broken_keras_model_file(job, refused, tmp_path):
    refused(job((ARCH_UNET, "<CNN_archi><path>model.keras</path></CNN_archi>")), "<CNN_archi>",
            f"the Keras model file {tmp_path / 'model.keras'} does not exist", "Hint: fix the <path>")
    (tmp_path / "model.keras").write_bytes(b"not a zip archive")
    refused(job((ARCH_UNET, "<CNN_archi><path>model.keras</path></CNN_archi>")), "<CNN_archi>",
            f"{tmp_path / 'model.keras'} is no Keras 3 model file (BadZipFile", "Hint: save the model with model.save")


def test_missing_data_path(job, refused, tmp_path):
    path = job((DATA_SYNTHETIC, '<data format="decathlon">\n      <train><path>data/missing</path></train>\n'
                                "    </data>"))
    refused(path, "data/missing", f"train {tmp_path / 'data' / 'missing'} does not exist", "Hint: fix the path")


def test_decathlon_without_train_points_at_data(job, refused):
    path = job((DATA_SYNTHETIC, '<data format="decathlon"/>'))
    refused(path, '<data format="decathlon"/>', "<data> needs <train>")


def test_missing_hostfile(job, refused, tmp_path):
    path = job((HYPER_END, HYPER_END + '\n    <cluster>\n      <property name="hostfile">hosts.txt</property>\n'
                                       "    </cluster>"))
    refused(path, "hosts.txt", f"hostfile {tmp_path / 'hosts.txt'} does not exist")


def test_missing_plugin_file(job, refused, tmp_path):
    path = job((CHECKPOINT, CHECKPOINT + '\n          <value name="LRSchedule"><path>ckpt1.py</path></value>'))
    refused(path, 'name="LRSchedule"', f"the checkpoint file {tmp_path / 'ckpt1.py'} does not exist")


def test_missing_strategy_file(job, refused, tmp_path):
    path = job((STRATEGY, STRATEGY.replace("ring_allreduce", "<path>mine/strategy.py</path>")))
    refused(path, "mine/strategy.py", f"the dist_strategy file {tmp_path / 'mine' / 'strategy.py'} does not exist")


def test_plugin_file_without_the_symbol(job, refused, tmp_path):
    copy_plugin("ckpt1.py", tmp_path)
    path = job((CHECKPOINT, CHECKPOINT + '\n          <value name="LRSchedul"><path>ckpt1.py</path></value>'))
    refused(path, 'name="LRSchedul"', "defines no 'LRSchedul' for checkpoint", "did you mean 'LRSchedule'?",
            'entry="..."')


def test_user_file_with_syntax_error_is_located_in_that_file(job, refused, tmp_path):
    (tmp_path / "broken.py").write_text("def build(:\n    pass\n")
    path = job((ARCH_UNET, "<CNN_archi><path>broken.py</path></CNN_archi>"))
    refused(path, 1, "syntax error in architecture file", file=tmp_path / "broken.py")


# ---- non-extensible actions cannot be overridden -------------------------------------------------------


def test_extensible_class_on_device_placement(job, refused):
    path = job((PLACEMENT, PLACEMENT.replace('class="non_extensible"', 'class="extensible"')))
    refused(path, "device_placement", "'device_placement' is a non-extensible action",
            'Hint: write class="non_extensible"')


def test_non_extensible_class_on_dist_strategy(job, refused):
    path = job((STRATEGY, STRATEGY.replace('class="extensible"', 'class="non_extensible"')))
    refused(path, "dist_strategy", "'dist_strategy' is an extensible action", 'Hint: write class="extensible"')


@pytest.mark.parametrize("klass", ["non_extensible", "extensible"])
def test_path_value_on_non_extensible_action(job, refused, tmp_path, klass):
    """A <path> may not override device_placement, even when the file exists and class= is consistent."""
    (tmp_path / "place.py").write_text("def place(**kw):\n    return 'cpu'\n")
    path = job((PLACEMENT, f'<action class="{klass}" type="device_placement"><value><path>place.py</path>'
                           "</value></action>"))
    refused(path, "device_placement", "non-extensible action: it can be parametrised but not overridden",
            "Hint: remove the <path> and pick one of: cpu, local_rank")


def test_plugin_in_non_extensible_action(job, refused, tmp_path):
    copy_plugin("ckpt1.py", tmp_path)
    path = job((MEMORY, MEMORY.replace("</value>", '</value>\n<value name="LRSchedule"><path>ckpt1.py</path>'
                                                   "</value>")))
    refused(path, 'name="LRSchedule"', "'memory_allocation' is non-extensible: user code cannot be plugged",
            "plug-ins go into extensible actions")


# ---- parallelism degree, types, enums, booleans -----------------------------------------------------------


@pytest.mark.parametrize("degree", ["0", "-3", "1000000000"])
def test_degree_out_of_bounds(job, refused, degree):
    path = job(("<parallelism-degree>2<", f"<parallelism-degree>{degree}<"))
    refused(path, "<parallelism-degree>", f"parallelism-degree is {degree}, it must be between 1 and 1000000",
            "Hint: set parallelism-degree between 1 and 1000000")


@pytest.mark.parametrize("degree", ["2.5", "two", ""])
def test_degree_not_an_integer(job, refused, degree):
    path = job(("<parallelism-degree>2<", f"<parallelism-degree>{degree}<"))
    refused(path, "<parallelism-degree>", f"parallelism-degree must be an integer, not '{degree}'",
            "Hint: write parallelism-degree as a whole number")


def test_wrong_type(job, refused):
    path = job(('<property name="lr">0.01<', '<property name="lr">fast<'))
    refused(path, '"lr">fast', "lr must be a number, not 'fast'", "Hint: write lr as a number such as 0.01")
    path = job(('<property name="lr">0.01<', '<property name="lr">nan<'))
    refused(path, '"lr">nan', "lr must be a number")
    path = job(('<property name="minibatch_size">4<', '<property name="minibatch_size">4.0<'))
    refused(path, "4.0", "minibatch_size must be an integer")


def test_out_of_range_parameter(job, refused):
    refused(job(('<param name="depth">3<', '<param name="depth">9<')), '"depth">9', "depth is 9",
            "between 1 and 8")


def test_unknown_hyperparameter(job, refused):
    path = job(('"minibatch_size"', '"minibarch_size"'))
    refused(path, "minibarch_size", "has no parameter 'minibarch_size'", "Hint: did you mean 'minibatch_size'?")


@pytest.mark.parametrize(("written", "value"), [("SGD", "sgd"), ("sgd", "sgd"), ("Adam", "adam"), ("ADAM", "adam")])
def test_enum_case_insensitive(job, written, value):
    gen = assemble(job((">SGD<", f">{written}<")))
    assert gen.hyperparameters.optimizer == value


def test_enum_alias_name(job):
    gen = assemble(job(('name="optimiser"', 'name="optimizer"'), (">SGD<", ">adam<")))
    assert gen.hyperparameters.optimizer == "adam"


def test_wrong_enum(job, refused):
    path = job((">SGD<", ">sgdd<"))
    refused(path, "sgdd", "'sgdd' is not a valid optimizer", "Hint: did you mean 'sgd'?")


def test_booleans(job, refused):
    monitoring = ('<monitoring><property name="plots">No</property><property name="tensorboard">TRUE</property>'
                  '<property name="progress">on</property><property name="stop_on_divergence">0</property>'
                  "</monitoring>")
    path = job((HYPER_END, HYPER_END + monitoring),
               (STRATEGY, STRATEGY.replace("</value>", '</value><value name="sync_batchnorm">yes</value>')))
    job_ = load_job(path)
    m, ((_, files),) = job_.monitoring, job_.trackers  # plots and tensorboard belong to the files tracker
    assert (files.plots, files.tensorboard, m.progress, m.stop_on_divergence) == (False, True, True, False)
    assert job_.generator.action("dist_strategy").config.sync_batchnorm is True
    path = job((HYPER_END, HYPER_END + '\n<monitoring><property name="plots">maybe</property></monitoring>'))
    refused(path, "maybe", "plots must be a boolean, not 'maybe'", "Hint: write plots as true or false")


@pytest.mark.parametrize(("start", "end"), [("3", "3"), ("5", "2")])
def test_end_epoch_not_after_start_epoch(job, refused, start, end):
    path = job(('"start_epoch">0<', f'"start_epoch">{start}<'), ('"end_epoch">3<', f'"end_epoch">{end}<'))
    refused(path, '"end_epoch"', f"end_epoch ({end}) must be greater than start_epoch ({start})")


def test_end_epoch_zero(job, refused):
    refused(job(('"end_epoch">3<', '"end_epoch">0<')), '"end_epoch"', "end_epoch is 0, it must be at least 1")


# ---- duplicates -------------------------------------------------------------------------------------------------


def test_duplicate_action(job, refused):
    path = job((MEMORY, MEMORY + "\n        " + MEMORY.replace("soft_placement", "fraction")))
    first = line_of(path, "memory_allocation")
    refused(path, "fraction", "action 'memory_allocation' is given twice", f"(first at line {first})",
            "Hint: keep one of them")


def test_duplicate_property(job, refused):
    path = job(('<property name="lr">0.01</property>',
                '<property name="lr">0.01</property>\n      <property name="lr">0.02</property>'))
    refused(path, "0.02", "<hyperparameters> property 'lr' is given twice", f"first at line {line_of(path, '0.01')}")


def test_duplicate_through_alias(job, refused):
    path = job(('<property name="optimiser">SGD</property>',
                '<property name="optimiser">SGD</property>\n      <property name="optimizer">adam</property>'))
    refused(path, '"optimizer"', "'optimizer' sets optimizer, already set at line")


def test_duplicate_param_and_value(job, refused):
    path = job(('<param name="depth">3</param>', '<param name="depth">3</param><param name="depth">4</param>'))
    refused(path, "depth", "<CNN_archi> param 'depth' is given twice")
    path = job((CHECKPOINT, CHECKPOINT + '\n<value name="every_epochs">2</value>'))
    refused(path, '"every_epochs">2', "value 'every_epochs' is given twice in this action")
    path = job(("<value>ring_allreduce</value>", "<value>ring_allreduce</value>\n<value>other</value>"))
    refused(path, "<value>other", "the implementation (an unnamed <value>) is given twice")


# ---- dependencies between actions, launcher ---------------------------------------------------------------------


def test_dependency_conflict(job, refused):
    comm = '<action class="non_extensible" type="communication_init"><value>torch_distributed</value></action>'
    path = job((PLACEMENT, comm + "\n        " + PLACEMENT),
               ("<value>ring_allreduce</value>", "<value>fake_needs_other</value>"))
    with registered("dist_strategy", "fake_needs_other", requires={"communication_init": ("something_else",)}):
        refused(path, "communication_init", "dist_strategy 'fake_needs_other' needs communication_init "
                "'something_else', but the job sets 'torch_distributed'", "Hint: change this action to something_else")
    assert "fake_needs_other" not in registry("dist_strategy").names()


def test_dependency_chosen_by_the_engine(job, cli):
    path = job(("<value>ring_allreduce</value>", "<value>fake_needs_other</value>"))
    with registered("dist_strategy", "fake_needs_other", requires={"communication_init": ("something_else",)}), \
            registered("communication_init", "something_else"):
        rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "- communication_init [non-extensible] = something_else  (built-in, chosen by the engine)" in out


def test_parameters_without_an_implementation_go_to_the_engines_choice(job, cli):
    comm = ('<action class="non_extensible" type="communication_init"><value name="interface">eth1</value>'
            '<value name="connect_timeout_s">5</value></action>')
    path = job((PLACEMENT, comm + "\n        " + PLACEMENT), ("<value>ring_allreduce</value>", "<value>horovod</value>"))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "- communication_init [non-extensible] = horovod  (built-in, chosen by the engine)" in out
    assert "interface=eth1, connect_timeout_s=5.0" in out
    rc, out, err = cli("plan", path, "--set", "framework=tensorflow", "--set", "dist_strategy=ring_allreduce")
    assert rc == 0 and "= tf_config  (built-in, chosen by the engine)" in out and "interface=eth1" in out, err


def test_launcher_conflict(job, refused):
    path = job(("<value>ring_allreduce</value>", "<value>fake_mpi_only</value>"),
               (HYPER_END, HYPER_END + '\n    <cluster><property name="launcher">inplace</property></cluster>'))
    with registered("dist_strategy", "fake_mpi_only", launchers=("mpirun",)):
        refused(path, "fake_mpi_only", "dist_strategy 'fake_mpi_only' cannot be started by the 'inplace' launcher",
                'Hint: set <property name="launcher"> to mpirun')


def test_unknown_launcher(job, refused):
    path = job((HYPER_END, HYPER_END + '\n    <cluster><property name="launcher">mpirn</property></cluster>'))
    refused(path, "mpirn", "'mpirn' is not a valid launcher", "did you mean 'mpirun'?")


# ---- good jobs ------------------------------------------------------------------------------------------------------


def test_job_assembles_into_the_thesis_tree(job):
    path = job()
    gen = assemble(path)
    assert (gen.world_size, gen.seed, gen.rundir.root) == (2, 0, path.parent / "runs" / "demo")
    assert [c.name for c in gen.root.children] == ["parallelism_definition", "model_definition"]
    assert [m.name for m in gen.root.modules()] == ["train_env_def", "train_strategy_def", "injection"]
    assert sorted(a.type for m in gen.root.modules() for a in m.actions) == sorted(p.type for p in POINTS)
    assert gen.action("architecture_injection").config.depth == 3
    assert gen.action("lr_policy").config.warmup_epochs == 1
    assert ("architecture_injection", "dist_strategy", "model") in {(b.source, b.target, b.carries)
                                                                  for b in gen.bindings}


def test_relative_paths_resolve_against_the_job_folder(job, tmp_path, monkeypatch):
    sub = tmp_path / "jobs"
    copy_plugin("my_net.py", sub / "nets")
    (sub / "data" / "Task01").mkdir(parents=True)
    (sub / "hosts").write_text("localhost slots=2\n")
    path = job((ARCH_UNET, "<CNN_archi><path>nets/my_net.py</path></CNN_archi>"),
               (DATA_SYNTHETIC, '<data format="decathlon"><train><path>data/Task01</path></train></data>'),
               (HYPER_END, HYPER_END + '<cluster><property name="hostfile">hosts</property></cluster>'),
               name="jobs/job.xml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job_ = load_job("../jobs/job.xml")
    gen = job_.generator
    assert gen.spec.file == path.resolve()
    assert gen.rundir.root == sub / "runs" / "demo"
    assert gen.action("dataset_injection").config.train == sub / "data" / "Task01"
    assert job_.launch.hostfile == sub / "hosts"
    assert gen.action("architecture_injection").entry.origin == f"file {sub / 'nets' / 'my_net.py'}"


@pytest.mark.parametrize(("entry", "symbol"), [("", "build"), (' entry="MyNet"', "MyNet")])
def test_user_architecture_file(job, cli, tmp_path, entry, symbol):
    net = copy_plugin("my_net.py", tmp_path)
    path = job((ARCH_UNET, f'<CNN_archi{entry}><path>my_net.py</path><param name="width">8</param></CNN_archi>'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert f"- architecture_injection [non-extensible] = {symbol}  (file {net})" in out
    action = assemble(path).action("architecture_injection")
    impl = action.entry.load()
    assert impl.__name__ == symbol
    assert action.params(impl) == {"width": 8}


def test_user_architecture_unknown_parameter(job, tmp_path):
    copy_plugin("my_net.py", tmp_path)
    path = job((ARCH_UNET, '<CNN_archi><path>my_net.py</path><param name="widht">8</param></CNN_archi>'))
    action = assemble(path).action("architecture_injection")
    with pytest.raises(JobError, match=r"takes no parameter 'widht'.*Hint: accepted: task, width") as info:
        action.params(action.entry.load())
    assert info.value.where.line == line_of(path, "widht")


@pytest.mark.parametrize(("entry", "symbol"), [("", "Strategy"), (' entry="OtherStrategy"', "OtherStrategy")])
def test_user_strategy_file(job, cli, tmp_path, entry, symbol):
    mine = copy_plugin("my_strategy.py", tmp_path / "strategies")
    path = job((STRATEGY, STRATEGY.replace("<value>ring_allreduce", f"<value{entry}><path>strategies/my_strategy.py"
                                                                    "</path>")))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert f"- dist_strategy [extensible] = {symbol}  (file {mine})" in out
    assert assemble(path).action("dist_strategy").entry.load().__name__ == symbol


def test_checkpoint_plugin_thesis_listing_4_1(job, cli, tmp_path):
    ckpt = copy_plugin("ckpt1.py", tmp_path)
    path = job((CHECKPOINT, CHECKPOINT + '\n          <value name="LRSchedule"><path>ckpt1.py</path></value>'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "- checkpoint [extensible] = periodic  (built-in)" in out
    assert f"plug-in LRSchedule: LRSchedule from file {ckpt}" in out
    plugin = assemble(path).action("checkpoint").plugins["LRSchedule"].load()
    assert plugin.__name__ == "LRSchedule" and hasattr(plugin(), "on_epoch_end")


@pytest.fixture
def demo_plugin(tmp_path_factory):
    """autocnnp-demo-plugin installed with pip into a private target folder that is put on sys.path."""
    src = tmp_path_factory.mktemp("src") / "autocnnp_demo_plugin"
    shutil.copytree(PLUGINS / "autocnnp_demo_plugin", src)  # pip builds in place: keep the repo clean
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-index", "--target", str(target), str(src)],
                   check=True, capture_output=True)
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("autocnnp_demo_plugin", None)


@pytest.mark.slow
def test_entry_point_strategy_from_an_installed_distribution(demo_plugin, job, cli):
    path = job(("<value>ring_allreduce</value>", '<value>my_ring</value><value name="chunks">3</value>'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "- dist_strategy [extensible] = my_ring  (entry point of autocnnp-demo-plugin 0.1)" in out
    assert "chunks=3" in out
    rc, out, err = cli("validate", job(("<value>ring_allreduce</value>", "<value>my_rign</value>"), name="typo.xml"))
    assert rc == 2 and "did you mean 'my_ring'?" in err


def test_entry_point_gone_once_off_sys_path(job, cli):
    """The fixture above cleaned sys.path up: the plug-in is unknown again (tests stay independent)."""
    rc, _, err = cli("validate", job(("<value>ring_allreduce</value>", "<value>my_ring</value>")))
    assert rc == 2 and "unknown dist_strategy 'my_ring'" in err


# ---- a user file without entry= -------------------------------------------------------------------------------

UNET_FILE = '''"""A U-Net of my own, as thesis Listing 4.1 names it: <CNN_archi><path>archi/U-Net.py</path></CNN_archi>."""
import torch
from torch import nn


def double_conv(a, b):
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU())


class MyUNet(nn.Module):
    def __init__(self, in_channels, num_classes, width: int = 4):
        super().__init__()
        self.body = double_conv(in_channels, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x))
'''


def test_a_file_with_one_network_class_is_used_without_entry(job, cli, tmp_path):
    (tmp_path / "archi").mkdir()
    (tmp_path / "archi" / "U-Net.py").write_text(UNET_FILE)
    path = job((ARCH_UNET, '<CNN_archi><path>archi/U-Net.py</path><param name="width">6</param></CNN_archi>'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert f"- architecture_injection [non-extensible] = MyUNet  (file {tmp_path / 'archi' / 'U-Net.py'})" in out
    net = assemble(path).action("architecture_injection").build(in_channels=2, num_classes=3)
    assert type(net).__name__ == "MyUNet" and net.head.in_channels == 6


def test_several_candidates_and_no_conventional_name_ask_for_entry(job, refused, tmp_path):
    (tmp_path / "two.py").write_text(UNET_FILE + "\n\nclass Other(nn.Module):\n    def forward(self, x):\n"
                                     "        return x\n")
    path = job((ARCH_UNET, "<CNN_archi><path>two.py</path></CNN_archi>"))
    refused(path, "<CNN_archi><path>two.py", "defines several candidates for architecture and no 'build'",
            "'MyUNet'", "'Other'", 'name the symbol with entry="..."')


def test_a_subclass_in_the_same_file_is_the_candidate_not_its_base(job, cli, tmp_path, refused):
    """Following inheritance within the file: a base class the network derives from is no second candidate;
    two leaves are."""
    body = ("from torch import nn\n\n\nclass Base(nn.Module):\n    def __init__(self, width):\n"
            "        super().__init__()\n        self.width = width\n\n\n"
            "class Net(Base):\n    def __init__(self, in_channels, num_classes):\n        super().__init__(4)\n"
            "        self.head = nn.Conv2d(in_channels, num_classes, 1)\n\n    def forward(self, x):\n"
            "        return self.head(x)\n")
    (tmp_path / "net.py").write_text(body)
    path = job((ARCH_UNET, "<CNN_archi><path>net.py</path></CNN_archi>"))
    rc, out, err = cli("plan", path)
    assert rc == 0 and "architecture_injection [non-extensible] = Net  (file" in out, err
    assert type(assemble(path).action("architecture_injection").build(in_channels=2, num_classes=3)).__name__ == "Net"
    (tmp_path / "net.py").write_text(body + "\n\nclass Wider(Base):\n    def forward(self, x):\n        return x\n")
    refused(path, "<CNN_archi><path>net.py", "defines several candidates for architecture", "'Net'", "'Wider'")


HALVE = '''class Halve:
    """Half the base rate."""

    def __init__(self, *, base_lr, **_):
        self.base_lr = base_lr

    def lr(self, epoch, step):
        return self.base_lr / 2
'''

PLAIN_STRATEGY = '''class Plain:
    def __init__(self, *, world, device, beat):
        self.world, self.device = world, device

    def wrap(self, model):
        return model

    def sampler(self, dataset, *, shuffle, seed):
        return range(len(dataset))
'''


def test_a_user_class_with_only_the_required_methods_gets_the_protocol_hooks(job, cli, tmp_path):
    """A policy defining only lr() and a strategy defining only wrap() and sampler() fit by their methods;
    built, they are the protocol's classes, with its documented no-op hooks (lr-plot's describe, the
    trainer's on_epoch_end, after_backward, wrap_optimizer ...)."""
    from autocnnp.generator.protocols import LRPolicy, Strategy

    (tmp_path / "halve.py").write_text(HALVE)
    (tmp_path / "plain.py").write_text(PLAIN_STRATEGY)
    path = job((STRATEGY, STRATEGY.replace("<value>ring_allreduce", "<value><path>plain.py</path>")),
               ('<value>gradual_warmup</value>\n          <value name="warmup_epochs">1</value>',
                "<value><path>halve.py</path></value>"))
    gen = assemble(path)
    policy = gen.lr_policy(steps_per_epoch=4)
    assert isinstance(policy, LRPolicy) and type(policy).__name__ == "Halve"
    assert policy.lr(0, 0) == gen.hyperparameters.lr / 2 and policy.describe() == "Half the base rate."
    policy.on_epoch_end(0, {})
    policy.load_state_dict(policy.state_dict())
    strategy = gen.action("dist_strategy").build(world=None, device="cpu", beat=lambda: None)
    assert isinstance(strategy, Strategy) and strategy.after_backward(None) is None
    assert strategy.wrap_optimizer("opt", None) == "opt"
    assert list(strategy.sampler([1, 2], shuffle=False, seed=0)) == [0, 1]
    rc, out, err = cli("lr-plot", path, "--out", tmp_path / "lr.png")
    assert rc == 0 and "Half the base rate" in out, err


def test_a_strategy_class_of_any_name_is_found_by_its_base(job, cli, tmp_path):
    (tmp_path / "mine.py").write_text("from autocnnp.generator.protocols import Strategy\n\n\n"
                                      "class ChunkedRing(Strategy):\n    '''Mine.'''\n")
    path = job((STRATEGY, STRATEGY.replace("<value>ring_allreduce", "<value><path>mine.py</path>")))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert f"- dist_strategy [extensible] = ChunkedRing  (file {tmp_path / 'mine.py'})" in out


def test_a_user_file_is_never_run_to_validate_a_job(job, cli, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"class Strategy:\n    requires = __import__('pathlib').Path({str(marker)!r}).touch()\n"
        f"    launchers = open({str(marker)!r}, 'w')\n    def wrap(self, m):\n        return m\n")
    path = job((STRATEGY, STRATEGY.replace("<value>ring_allreduce", "<value><path>evil.py</path>")))
    assert cli("validate", path)[0] == 0
    evil_name = job((STRATEGY, STRATEGY.replace("<value>ring_allreduce", "<value>../../evil")), name="name.xml")
    rc, _, err = cli("validate", evil_name)
    assert rc == 2 and "unknown dist_strategy '../../evil'" in err
    assert not marker.exists()
