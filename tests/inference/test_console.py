"""Library logs go to the run's log file; the console keeps the stage's lines, warnings and errors."""

import logging
import re

import pytest

from inference.console import library_output, route_library_logs

LIBRARY_LINE = re.compile(r"^(INFO|DEBUG)\b|^INFO:|^\S+ INFO: ", re.M)


@pytest.fixture
def routed(tmp_path):
    log_file = tmp_path / "logs" / "stage.log"
    route_library_logs(log_file, verbose=False)
    yield log_file
    route_library_logs(None, verbose=False)  # no log file left open; libraries quiet, as after a CLI call


def test_library_info_goes_to_the_log_file_and_warnings_to_the_console(routed, capsys):
    logging.getLogger("transformers.modeling_utils").info("loading weights file")
    logging.getLogger("lightning.pytorch").info("GPU available: False")
    logging.getLogger("accelerate.utils.modeling").warning("offloading to disk")
    out, err = capsys.readouterr()
    assert out == "" and "loading weights" not in err and "GPU available" not in err
    assert "accelerate.utils.modeling WARNING: offloading to disk" in err
    logged = routed.read_text()
    assert "INFO transformers.modeling_utils: loading weights file" in logged
    assert "INFO lightning.pytorch: GPU available: False" in logged


def test_a_harmless_library_warning_goes_to_the_log_file_only(routed, capsys):
    logging.getLogger("accelerate.utils.modeling").warning(
        "The model weights are not tied. Please use the `tie_weights` method before using the `infer_auto_device` function.")
    logging.getLogger("accelerate.big_modeling").warning("The model weights are not tied")  # another logger: shown
    _, err = capsys.readouterr()
    assert "accelerate.utils.modeling" not in err
    assert "accelerate.big_modeling WARNING: The model weights are not tied" in err
    assert "WARNING accelerate.utils.modeling: The model weights are not tied" in routed.read_text()


def test_gptqmodel_lines_prints_and_bars_leave_the_console(routed, capsys):
    from gptqmodel.utils.logger import setup_logger

    log = setup_logger()
    with library_output():
        log.info("Kernel: loaded -> `[TorchLinear]`")
        log.warn("Calibration dataset size should be more than 256.")
        print("Files in directory:")
        for _ in log.pb(range(3)).title("Quantizing layer"):
            pass
    out, err = capsys.readouterr()
    assert not LIBRARY_LINE.search(out + err) and "Files in directory" not in out + err
    assert "Quantizing layer" not in out + err
    assert "gptqmodel WARNING: Calibration dataset size should be more than 256." in err
    logged = routed.read_text()
    assert "INFO gptqmodel: Kernel: loaded -> `[TorchLinear]`" in logged
    assert "INFO gptqmodel: Files in directory:" in logged


def test_verbose_leaves_library_output_on_the_console(tmp_path, capsys):
    route_library_logs(tmp_path / "v.log", verbose=True)
    try:
        logging.getLogger("transformers.modeling_utils").info("loading weights file")
        with library_output():
            print("Files in directory:")
    finally:
        route_library_logs(None, verbose=False)
    out, err = capsys.readouterr()
    assert "Files in directory:" in out and "loading weights file" in err
