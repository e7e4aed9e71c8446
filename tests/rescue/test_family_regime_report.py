import shutil

from conftest import REPO_ROOT as ROOT
from conftest import benchmark_script

RECORD = ROOT / "docs" / "regime" / "regime-tiny-m-seed1.json"

main = benchmark_script("family_regime").main


def test_report_redraws_beside_the_record_under_its_own_name(tmp_path, capsys):
    record = tmp_path / "regime-tiny-m-seed1.json"
    shutil.copy(RECORD, record)
    assert main(["--report", str(record)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "regime-tiny-m-seed1.json", "regime-tiny-m-seed1.md", "trace-lengths-tiny-m-seed1.png"]
    table = (tmp_path / "regime-tiny-m-seed1.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert "# Failure regime of tiny-m" in table and "| 2-bit g32 |" in table and "seed 1;" in table


def test_report_of_a_missing_or_broken_record_is_one_line(tmp_path, capsys):
    assert main(["--report", str(tmp_path / "nowhere.json")]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "nowhere.json" in error[0]
    (tmp_path / "broken.json").write_text("{\"model\": ")
    assert main(["--report", str(tmp_path / "broken.json")]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "broken.json" in error[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]
