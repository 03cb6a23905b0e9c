"""bench-data on a few real-photo shards: the stage split, the bare PIL limit and RSS per epoch are reported."""

from ijepa_scale.benchmarks.data import benchmark_stream, format_table
from tests.helpers.photos import make_photo_shards


def test_bench_data_reports_split_limit_and_rss(tmp_path):
    make_photo_shards(tmp_path, sizes=[16, 16], num_classes=2, size=(96, 72))
    summary = benchmark_stream(str(tmp_path / "train-{000000..000001}.tar"), [0], batch_size=4, crop_size=64,
                               patch_size=8, batches=2, per_core_images=16, rss_epochs=2, log=lambda _: None)
    (row,) = summary["results"]
    assert row["img_per_s"] > 0 and row["bare_pil_rrc_img_per_cpu_s"] > 0
    assert set(row["stage_ms"]) == {"read", "decode", "crop", "collate"}
    assert all(v > 0 for v in row["stage_ms"].values())
    assert [r["epoch"] for r in summary["rss"]] == [1, 2] and all(r["main_rss_mb"] > 50 for r in summary["rss"])
    table = format_table(summary)
    assert "bare PIL limit" in table and "RSS after epoch 2" in table
