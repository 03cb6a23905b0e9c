import pandas as pd
import pytest

from ijepa_scale.metrics import COLUMNS, CSVMetrics


def row(step, loss):
    values = {c: 0 for c in COLUMNS}
    values.update(step=step, loss=loss, epoch=1, itr=step - 1)
    return values


def test_header_starts_with_official_columns():
    assert COLUMNS[:6] == ("epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)")


def test_full_precision_and_resume_truncation(tmp_path):
    path = tmp_path / "jepa_r0.csv"
    log = CSVMetrics(path, resume_step=None)
    losses = [0.1 + i / 3 for i in range(6)]
    for step, loss in enumerate(losses, start=1):
        log.log(**row(step, loss))
    log.close()
    # Resume from a checkpoint at step 4: rows 5 and 6 are replayed, so they are removed first.
    log = CSVMetrics(path, resume_step=4)
    for step in (5, 6, 7):
        log.log(**row(step, losses[step - 1] if step <= 6 else 9.0))
    log.close()
    frame = pd.read_csv(path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert frame["loss"].tolist()[:6] == losses  # exact float round trip


def test_missing_column_is_a_bug(tmp_path):
    log = CSVMetrics(tmp_path / "x.csv", resume_step=None)
    with pytest.raises(AssertionError, match="missing metric columns"):
        log.log(step=1)


def test_resume_over_an_official_csv_keeps_it_aside(tmp_path):
    path = tmp_path / "jepa_r0.csv"
    path.write_text("epoch,itr,loss,mask-A,mask-B,time (ms)\n1,0,0.50000,69.0,44.0,1200\n")
    log = CSVMetrics(path, resume_step=625)
    log.log(**row(626, 0.4))
    log.close()
    assert pd.read_csv(path)["step"].tolist() == [626]
    (kept,) = tmp_path.glob("jepa_r0.previous-*.csv")
    assert kept.read_text().startswith("epoch,itr,loss,mask-A,mask-B,time (ms)\n1,0,0.5")
