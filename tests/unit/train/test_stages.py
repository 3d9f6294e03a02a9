"""The study's stages on tiny cached volumes: data, pre-training chain, fine-tuning, metrics."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medtx.data.cache import cache_volume
from medtx.errors import BadScanError, CohortError, ConfigError, MedtxError
from medtx.metrics import dice, mauc
from medtx.models import build_model
from medtx.train.checkpoints import last_path, load_pretrained, load_state, model_from_checkpoint
from medtx.train.config import DEFAULTS, resolve_config
from medtx.train.data import VolumeSet, collate, manifest_items
from medtx.train.finetune import finetune
from medtx.train.inference import dice_per_case, evaluate_predictions, predict
from medtx.train.pretrain import pretrain_exemplar, pretrain_masked
from tests.conftest import sphere, write_nifti

TINY = (16, 20, 12)
FAST = {"lr": 1e-3, "batch_size": 4, "threads": 1, "log_every": 100, "seed": 3}
TWO_CLASSES = {"label_map": {"CN": 0, "AD": 1}}


def ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return np.sqrt(((grid - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0)) < radius


def blob_volume(rng, shape, bright):
    """Dim noise, plus a bright ball for class 1 (a contrast the slice-stack norm keeps)."""
    volume = rng.uniform(0.0, 0.2, shape)
    if bright:
        centre = [rng.uniform(4, s - 4) for s in shape]
        volume[ball(shape, centre, 3.5)] = 0.9
    return volume


def write_items(root, n, *, task="classification", shape=TINY, seed=0, prefix="s"):
    """n cached scans with labels; classification alternates 0/1, regression ages 50-80."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        scan = f"{prefix}{i:02d}"
        item = {
            "dataset": "toy",
            "subject": scan,
            "session": "",
            "scan": scan,
            "image": str(root / f"{scan}.npy"),
            "label": "",
            "seg": None,
        }
        if task == "segmentation":
            centre = [rng.uniform(5, s - 5) for s in shape]
            wt, tc, et = (ball(shape, centre, r) for r in (4.5, 3.0, 1.8))
            image = np.stack(
                [rng.uniform(0, 0.2, shape) + 0.5 * wt * (c + 1) / 4 for c in range(4)]
            )
            np.save(item["image"], image.astype(np.float16))
            item["seg"] = str(root / f"{scan}_regions.npy")
            np.save(item["seg"], np.stack([wt, tc, et]).astype(np.uint8))
        else:
            label = i % 2 if task == "classification" else 50 + 30 * rng.random()
            item["label"] = str(label) if task == "classification" else f"{label:.1f}"
            np.save(item["image"], blob_volume(rng, shape, i % 2)[None].astype(np.float16))
        items.append(item)
    return items


# ---------------------------------------------------------------------------- data


def test_downsample_halves_each_spatial_size(tmp_path):
    items = write_items(tmp_path, 1, shape=(24, 28, 20))
    odd = write_items(tmp_path / "odd", 1, shape=(25, 29, 21))
    full = VolumeSet(items, task="classification")[0]["image"]
    half = VolumeSet(items, task="classification", downsample=2)[0]["image"]
    assert full.shape == (1, 24, 28, 20) and full.dtype == torch.float32
    assert half.shape == (1, 12, 14, 10)
    assert VolumeSet(odd, task="classification", downsample=2)[0]["image"].shape == (1, 12, 14, 10)
    assert half[0, 3, 4, 5] == pytest.approx(float(full[0, 6:8, 8:10, 10:12].mean()), abs=1e-6)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("factor", [1, 2])
def test_stored_items_prepared_on_the_device_equal_the_float32_path(tmp_path, task, factor):
    """The loader moves float16 volumes and uint8 masks as cached; ``prepare``
    (float32, pooling) gives the batch the float32 path gives, bit for bit."""
    items = write_items(tmp_path, 3, task=task, shape=(24, 28, 20))
    stored = VolumeSet(items, task=task, downsample=factor, stored=True)
    raw = collate([stored[i] for i in range(3)])
    assert raw["image"].dtype == torch.float16 and raw["image"].shape[2:] == (24, 28, 20)
    if task == "segmentation":
        assert raw["target"].dtype == torch.bool
    batch = stored.prepare(raw)
    plain = collate([VolumeSet(items, task=task, downsample=factor)[i] for i in range(3)])
    assert torch.equal(batch["image"], plain["image"])
    assert torch.equal(batch["target"], plain["target"])


def test_a_cache_that_overflows_float16_is_refused_when_written(tmp_path):
    volume = np.zeros((6, 6, 6), np.float32)
    volume[:2] = 1e5  # finite in float32, beyond float16's 65504
    path = write_nifti(tmp_path / "hot.nii.gz", volume)
    with pytest.raises(BadScanError, match="hot.nii.gz: 72 voxel.*NaN or Inf in float16"):
        cache_volume(path, tmp_path / "hot.npy")
    assert not (tmp_path / "hot.npy").exists()


def test_segmentation_targets_are_max_pooled_regions(tmp_path):
    items = write_items(tmp_path, 1, task="segmentation", shape=(24, 28, 20))
    full = VolumeSet(items, task="segmentation")[0]
    half = VolumeSet(items, task="segmentation", downsample=2)[0]
    assert full["image"].shape == (4, 24, 28, 20) and full["target"].shape == (3, 24, 28, 20)
    assert half["image"].shape == (4, 12, 14, 10) and half["target"].shape == (3, 12, 14, 10)
    expected = full["target"].reshape(3, 12, 2, 14, 2, 10, 2).amax(dim=(2, 4, 6))
    assert torch.equal(half["target"], expected)
    wt, tc, et = half["target"]
    assert (wt >= tc).all() and (tc >= et).all() and et.sum() > 0  # nesting kept


def test_volume_set_targets_and_collate(tmp_path):
    cls = VolumeSet(write_items(tmp_path / "c", 2), task="classification")
    reg = VolumeSet(write_items(tmp_path / "r", 2, task="regression"), task="regression")
    batch = collate([cls[0], cls[1]])
    assert batch["image"].shape == (2, 1, *TINY)
    assert batch["target"].dtype == torch.long and batch["target"].tolist() == [0, 1]
    assert reg[0]["target"].dtype == torch.float32
    assert "target" not in VolumeSet(cls.items, task="pretrain")[0]


def test_volume_set_reads_the_volumes_cache(tmp_path):
    nifti = write_nifti(tmp_path / "sub-01_T1w.nii.gz", sphere(shape=(24, 28, 20)))
    npy = cache_volume(nifti, tmp_path / "sub-01.npy")
    item = {"scan": "sub-01", "image": str(npy), "label": "1"}
    assert VolumeSet([item], task="classification", downsample=2)[0]["image"].shape == (
        1,
        12,
        14,
        10,
    )


def test_bad_items_are_named(tmp_path):
    items = write_items(tmp_path, 2)
    with pytest.raises(CohortError, match=r"scan 's01'.*class label 'AD' is not an integer"):
        VolumeSet([items[0], {**items[1], "label": "AD"}], task="classification")
    with pytest.raises(CohortError, match="no 'seg' region cache path"):
        VolumeSet(items, task="segmentation")
    data = VolumeSet([{**items[0], "image": str(tmp_path / "gone.npy")}], task="classification")
    with pytest.raises(BadScanError, match=r"s00: .*gone\.npy: cached volume does not exist"):
        data[0]


def manifest(n=10):
    rows = []
    for i in range(n):
        role = "test" if i < 2 else "val" if i < 4 else "train"
        rows.append(
            {
                "dataset": "toy",
                "subject": f"s{i}",
                "session": "",
                "scan": f"sub-s{i}",
                "path": f"/data/sub-s{i}_T1w.nii.gz",
                "label": str(i % 2),
                "fold": "0",
                "override": "",
                "role_0": role,
                "frac_0": ("10" if i < 5 else "50" if i < 7 else "100") if role == "train" else "",
            }
        )
    return pd.DataFrame(rows)


def test_manifest_items_by_role_and_fraction():
    m = manifest()
    train = manifest_items(m, fold=0, role="train")
    assert [i["scan"] for i in train] == [f"sub-s{i}" for i in range(4, 10)]
    assert train[0]["image"] == "/data/sub-s4_T1w.npy" and train[0]["seg"] is None
    assert [i["scan"] for i in manifest_items(m, fold=0, role="train", fraction=50)] == [
        "sub-s4",
        "sub-s5",
        "sub-s6",
    ]
    assert len(manifest_items(m, fold=0, role="test", fraction=10)) == 2
    custom = manifest_items(m, fold=0, role="val", cache_dir_fn=lambda r: f"c/{r['scan']}.npy")
    assert [i["image"] for i in custom] == ["c/sub-s2.npy", "c/sub-s3.npy"]
    with pytest.raises(MedtxError, match=r"no fold 3 .*\['role_0'\]"):
        manifest_items(m, fold=3, role="train")
    with pytest.raises(MedtxError, match="no train scans in fold 0 at fraction 5%"):
        manifest_items(m, fold=0, role="train", fraction=5)


def test_config_keys_are_checked():
    assert resolve_config()["lr"] == 1e-4 and set(resolve_config()) == set(DEFAULTS)
    with pytest.raises(ConfigError, match=r"unknown training config key\(s\) \['learning_rate'\]"):
        resolve_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="downsample must be an integer >= 1"):
        resolve_config({"downsample": 1.5})
    with pytest.raises(ConfigError, match="loss_regression 'huber'"):
        resolve_config({"loss_regression": "huber"})


# ---------------------------------------------------------------------------- fine-tuning


def test_finetune_classification_learns_a_blob(tmp_path):
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, seed=s, prefix=p)
        for n, s, p in ((16, 0, "tr"), (8, 1, "va"), (6, 2, "te"))
    )
    cfg = {**FAST, **TWO_CLASSES, "epochs": 3, "patience": 3}
    result = finetune(
        "classification",
        train,
        val,
        test,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "pred.tsv",
        config=cfg,
        log=lambda _: None,
    )
    assert result.status == "finished"
    assert result.best_metric > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    table = pd.read_csv(tmp_path / "pred.tsv", sep="\t")
    assert list(table.columns) == ["scan", "subject", "label", "prediction", "p_0", "p_1"]
    assert len(table) == 6
    np.testing.assert_allclose(table[["p_0", "p_1"]].sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((tmp_path / "pred.json").read_text())
    assert metrics["mauc"] == pytest.approx(mauc(table["label"], table[["p_0", "p_1"]].values))
    assert metrics["selected_by"] == "val mAUC (ties: val log-likelihood)"
    assert metrics["init"] == "scratch"
    model, ckpt = model_from_checkpoint(tmp_path / "m.pt")
    assert ckpt["metadata"]["subjects"] == sorted(f"toy:{i['subject']}" for i in train)
    assert model.head.linear.out_features == 2


def test_finetune_regression_writes_predictions_and_metrics(tmp_path):
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, task="regression", seed=s, prefix=p)
        for n, s, p in ((4, 0, "tr"), (4, 1, "va"), (3, 2, "te"))
    )
    result = finetune(
        "regression",
        train,
        val,
        test,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "pred.tsv",
        metrics_out=tmp_path / "m.json",
        config={**FAST, "epochs": 1, "loss_regression": "mse"},
        log=lambda _: None,
    )
    table = pd.read_csv(tmp_path / "pred.tsv", sep="\t")
    columns = ["scan", "subject", "label", "prediction", "gap", "gap_corrected"]
    assert list(table.columns) == columns
    assert table["prediction"].between(0, 150).all()  # de-standardized to years
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mae"] == pytest.approx(np.abs(table["label"] - table["prediction"]).mean())
    meta = load_state(tmp_path / "m.pt")["metadata"]
    ages = np.array([float(i["label"]) for i in train])
    assert meta["target_mean"] == pytest.approx(ages.mean())
    assert meta["target_std"] == pytest.approx(ages.std())
    assert result.extra["metrics"]["mae"] == metrics["mae"]

    # the age-bias line is the best model's fit on the validation scans, not the test scans
    model, ckpt = model_from_checkpoint(tmp_path / "m.pt")
    stats = (ckpt["metadata"]["target_mean"], ckpt["metadata"]["target_std"])
    pred_val = predict(
        model,
        VolumeSet(val, task="regression", stored=True),
        batch_size=FAST["batch_size"],
        device=torch.device("cpu"),
        target_stats=stats,
    )
    slope, intercept = np.polyfit(pred_val["target"], pred_val["age"], 1)
    bias = metrics["age_bias"]
    assert bias["fitted_on"] == "validation" and bias["n"] == len(val)
    assert bias["slope"] == pytest.approx(slope, rel=1e-6, abs=1e-6)
    assert bias["intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-6)
    label, prediction = table["label"], table["prediction"]
    assert table["gap"].to_numpy() == pytest.approx((prediction - label).to_numpy(), abs=1e-3)
    expected = prediction - (bias["slope"] * label + bias["intercept"])
    assert table["gap_corrected"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-3)
    assert metrics["mean_gap_corrected"] == pytest.approx(table["gap_corrected"].mean())
    assert metrics["r_gap_age"] == pytest.approx(np.corrcoef(prediction - label, label)[0, 1])


def test_finetune_regression_with_one_validation_scan_has_no_age_bias(tmp_path):
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, task="regression", seed=s, prefix=p)
        for n, s, p in ((4, 0, "tr"), (1, 1, "va"), (3, 2, "te"))
    )
    lines = []
    finetune(
        "regression",
        train,
        val,
        test,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "pred.tsv",
        config={**FAST, "epochs": 1},
        log=lines.append,
    )
    assert list(pd.read_csv(tmp_path / "pred.tsv", sep="\t").columns) == [
        "scan",
        "subject",
        "label",
        "prediction",
        "gap",
    ]
    metrics = json.loads((tmp_path / "pred.json").read_text())
    assert metrics["age_bias"] is None and "mean_gap_corrected" not in metrics
    assert "mean_gap" in metrics
    assert any("no age-bias correction" in line and "got 1" in line for line in lines)


def test_finetune_fold_reads_the_cache_index_and_records_the_run(tmp_path):
    """The workflow's entry point: scans from the manifest, files from the cache index,
    the run's identity written into metrics.json and the checkpoint."""
    from medtx.data.cache import write_cache_index
    from medtx.domain import RunId
    from medtx.train.finetune import finetune_fold

    items = write_items(tmp_path / "cache", 10, task="regression", prefix="sub-s")
    table = manifest()
    table["scan"] = [i["scan"] for i in items]
    table["label"] = [i["label"] for i in items]
    manifest_tsv = tmp_path / "toy_task-regression_folds.tsv"
    table.to_csv(manifest_tsv, sep="\t", index=False)
    index = write_cache_index(
        "toy", [i["scan"] for i in items], [i["image"] for i in items], tmp_path / "toy.tsv"
    )
    run = RunId("toy", "regression", "scratch", 50, 0)
    kw = dict(
        manifest=manifest_tsv,
        cache_index=index,
        init_checkpoint=None,
        out=tmp_path / "model.pt",
        predictions_out=tmp_path / "predictions.tsv",
        metrics_out=tmp_path / "metrics.json",
        config={**FAST, "epochs": 1},
        metadata={"preprocess_hash": "x"},
    )
    finetune_fold(run, **kw)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"] == run.as_dict()
    meta = load_state(tmp_path / "model.pt")["metadata"]
    assert meta["run"] == run.as_dict() and meta["cache_index"] == str(index)
    assert meta["train_scans"] == [items[i]["scan"] for i in (4, 5, 6)]  # frac_0 <= 50
    assert len(pd.read_csv(tmp_path / "predictions.tsv", sep="\t")) == 2  # test fold 0
    with pytest.raises(MedtxError, match="init 'pretrained' needs the pre-trained checkpoint"):
        finetune_fold(RunId("toy", "regression", "pretrained", 50, 0), **kw)
    short = write_cache_index(
        "toy", [i["scan"] for i in items[:9]], [i["image"] for i in items[:9]], tmp_path / "s.tsv"
    )
    with pytest.raises(MedtxError, match=r"s\.tsv: no cache for scan\(s\) \['sub-s09'\]"):
        finetune_fold(run, **{**kw, "cache_index": short})


def test_finetune_segmentation_writes_dice_per_case(tmp_path):
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, task="segmentation", seed=s, prefix=p)
        for n, s, p in ((2, 0, "tr"), (1, 1, "va"), (2, 2, "te"))
    )
    finetune(
        "segmentation",
        train,
        val,
        test,
        out=tmp_path / "m.pt",
        predictions_out=tmp_path / "pred.tsv",
        config={**FAST, "epochs": 1},
        log=lambda _: None,
    )
    table = pd.read_csv(tmp_path / "pred.tsv", sep="\t")
    assert list(table.columns) == ["scan", "subject", "label", "dice_WT", "dice_TC", "dice_ET"]
    assert len(table) == 2 and table[["dice_WT", "dice_TC", "dice_ET"]].stack().between(0, 1).all()
    metrics = json.loads((tmp_path / "pred.json").read_text())
    assert metrics["dice_mean"] == pytest.approx(
        table[["dice_WT", "dice_TC", "dice_ET"]].to_numpy().mean()
    )
    assert load_state(tmp_path / "m.pt")["metadata"]["model_kwargs"]["in_channels"] == 4


def test_dice_per_case_matches_metrics_dice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, 5, generator=g)
    target = (torch.rand(2, 3, 6, 7, 5, generator=g) > 0.7).float()
    target[1, 2] = 0
    logits[1, 2] = -1  # empty vs empty: 1.0
    got = dice_per_case(logits, target)
    for b in range(2):
        for r in range(3):
            assert got[b, r].item() == pytest.approx(
                dice((logits[b, r] > 0).numpy(), target[b, r].numpy())
            )
    assert got[1, 2] == 1.0


def test_finetune_resume_after_kill_equals_uninterrupted(tmp_path):
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, seed=s, prefix=p)
        for n, s, p in ((8, 0, "tr"), (4, 1, "va"), (2, 2, "te"))
    )
    cfg = {**FAST, **TWO_CLASSES, "epochs": 2}

    def go(name, **kw):
        return finetune(
            "classification",
            train,
            val,
            test,
            out=tmp_path / f"{name}.pt",
            predictions_out=tmp_path / f"{name}.tsv",
            config=cfg,
            log=lambda _: None,
            **kw,
        )

    go("whole")
    cut = go("cut", max_steps_this_run=3)  # epoch 2, step 1 of 2
    assert cut.status == "interrupted" and not (tmp_path / "cut.tsv").exists()
    rest = go("cut")
    assert rest.resumed_from == (1, 1) and rest.status == "finished"
    a, b = load_state(tmp_path / "whole.pt")["model"], load_state(tmp_path / "cut.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "whole.tsv", sep="\t"), pd.read_csv(tmp_path / "cut.tsv", sep="\t")
    )


def test_rewritten_inputs_start_fresh_instead_of_resuming(tmp_path):
    """A job Snakemake reruns on new data must not resume the old data's checkpoint."""
    data = tmp_path / "data"
    train, val, test = (
        write_items(data, n, seed=s, prefix=p)
        for n, s, p in ((4, 0, "tr"), (2, 1, "va"), (2, 2, "te"))
    )
    cfg = {**FAST, **TWO_CLASSES, "epochs": 2}
    lines = []

    def go(**kw):
        return finetune(
            "classification",
            train,
            val,
            test,
            out=tmp_path / "m.pt",
            predictions_out=tmp_path / "m.tsv",
            config=cfg,
            log=lines.append,
            **kw,
        )

    assert go(max_steps_this_run=1).status == "interrupted"
    assert go(max_steps_this_run=1).resumed_from == (0, 1)  # same inputs: a requeue resumes
    image = train[0]["image"]
    np.save(image, np.load(image))  # the same scan, rewritten (e.g. after an N4 change)
    lines.clear()
    fresh = go()
    assert fresh.resumed_from is None and fresh.status == "finished"
    assert any("starting fresh" in line and "inputs" in line for line in lines), lines


# ---------------------------------------------------------------------------- the chain


def test_pretrain_chain_loads_weights_into_finetune(tmp_path):
    data = tmp_path / "data"
    pre = write_items(data, 5, seed=5, prefix="pre")  # batches of 4, then a lone 1 (dropped)
    cfg = {**FAST, **TWO_CLASSES, "epochs": 1}
    s1 = pretrain_exemplar(pre, out=tmp_path / "s1.pt", config=cfg, log=lambda _: None)
    assert s1.status == "finished" and s1.global_step == 1
    s2 = pretrain_masked(
        pre, init=tmp_path / "s1.pt", out=tmp_path / "s2.pt", config=cfg, log=lambda _: None
    )
    assert s2.status == "finished" and s2.global_step == 2
    st1, st2 = (load_state(tmp_path / f"{s}.pt") for s in ("s1", "s2"))
    assert st1["metadata"]["trained"] == ["encoders"]
    assert st1["selected_by"] == "training loss" and st2["metadata"]["init"]["loaded"] == [
        "encoders"
    ]
    enc = [k for k in st2["model"] if k.startswith("encoders.")]
    trf = [k for k in st2["model"] if k.startswith("transformer.")]
    assert all(torch.equal(st1["model"][k], st2["model"][k]) for k in enc)  # frozen in stage 2
    assert any(not torch.equal(st1["model"][k], st2["model"][k]) for k in trf)  # trained

    train, val, test = (
        write_items(data, n, seed=s, prefix=p)
        for n, s, p in ((4, 0, "tr"), (2, 1, "va"), (2, 2, "te"))
    )
    kw = dict(
        init=tmp_path / "s2.pt",
        out=tmp_path / "ft.pt",
        predictions_out=tmp_path / "ft.tsv",
        config=cfg,
        log=lambda _: None,
    )
    loaded = finetune("classification", train, val, test, max_steps_this_run=0, **kw)
    assert loaded.status == "interrupted"  # the state as loaded, before any step
    start = torch.load(last_path(tmp_path / "ft.pt"), weights_only=True)["model"]
    assert all(torch.equal(start[k], st2["model"][k]) for k in enc + trf)
    done = finetune("classification", train, val, test, **kw)
    assert done.status == "finished"
    meta = load_state(tmp_path / "ft.pt")["metadata"]
    assert meta["init"]["loaded"] == ["encoders", "transformer"]
    assert meta["init"]["init_stage"] == "pretrain_masked"

    # stage 1 alone: its random transformer is not loaded
    model = build_model("table3", "classification", num_outputs=2)
    assert load_pretrained(model, tmp_path / "s1.pt")["loaded"] == ["encoders"]

    # BraTS: the 1-channel stems are inflated over 4 modalities
    seg = write_items(data / "seg", 2, task="segmentation", seed=6)
    finetune(
        "segmentation",
        seg[:1],
        seg[1:],
        seg[1:],
        init=tmp_path / "s2.pt",
        out=tmp_path / "seg.pt",
        predictions_out=tmp_path / "seg.tsv",
        config=cfg,
        max_steps_this_run=0,
        log=lambda _: None,
    )
    stem = torch.load(last_path(tmp_path / "seg.pt"), weights_only=True)["model"][
        "encoders.0.stem.weight"
    ]
    assert stem.shape[1] == 4
    for c in range(4):
        assert torch.equal(stem[:, c : c + 1], st2["model"]["encoders.0.stem.weight"])


def test_learned_mask_token_is_trained_and_saved(tmp_path):
    pre = write_items(tmp_path, 2, seed=5, prefix="pre")
    cfg = {**FAST, "epochs": 1, "mask_token": "learned"}
    pretrain_exemplar(pre, out=tmp_path / "s1.pt", config=cfg, log=lambda _: None)
    pretrain_masked(
        pre, init=tmp_path / "s1.pt", out=tmp_path / "s2.pt", config=cfg, log=lambda _: None
    )
    model, ckpt = model_from_checkpoint(tmp_path / "s2.pt")
    assert ckpt["model"]["mask_token.tokens"].shape == (3, model.d_model)
    assert ckpt["metadata"]["stage"] == "pretrain_masked"


def test_pretrained_preset_mismatch_is_named(tmp_path):
    pre = write_items(tmp_path, 2, seed=5, prefix="pre")
    cfg = {**FAST, "epochs": 1}
    pretrain_exemplar(pre, out=tmp_path / "s1.pt", config=cfg, log=lambda _: None)
    model = build_model("paper_text", "classification")
    with pytest.raises(ConfigError, match=r"s1\.pt \(preset 'table3'\) does not fit this model"):
        load_pretrained(model, tmp_path / "s1.pt")


# ---------------------------------------------------------------------------- evaluation


def test_evaluate_predictions(tmp_path):
    cls = tmp_path / "cls.tsv"
    pd.DataFrame(
        {
            "scan": list("abcd"),
            "subject": list("abcd"),
            "label": [0, 1, 2, 1],
            "prediction": [0, 1, 2, 0],
            "p_0": [0.8, 0.1, 0.1, 0.5],
            "p_1": [0.1, 0.8, 0.1, 0.3],
            "p_2": [0.1, 0.1, 0.8, 0.2],
        }
    ).to_csv(cls, sep="\t", index=False)
    out = evaluate_predictions("classification", cls)
    assert out["n"] == 4 and out["accuracy"] == 0.75 and out["mauc_classes"] == [0, 1, 2]
    assert out["mauc"] == pytest.approx(
        mauc(
            np.array([0, 1, 2, 1]),
            np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]]),
        )
    )
    reg = tmp_path / "reg.tsv"
    pd.DataFrame(
        {
            "scan": ["a", "b"],
            "subject": ["a", "b"],
            "label": [60.0, 70.0],
            "prediction": [62.0, 69.0],
        }
    ).to_csv(reg, sep="\t", index=False)
    assert evaluate_predictions("regression", reg) == {"task": "regression", "n": 2, "mae": 1.5}
    gaps = tmp_path / "gaps.tsv"
    pd.DataFrame(
        {
            "label": [60.0, 70.0, 80.0],
            "prediction": [64.0, 70.0, 76.0],
            "gap": [4.0, 0.0, -4.0],
            "gap_corrected": [1.0, -1.0, 1.0],
        }
    ).to_csv(gaps, sep="\t", index=False)
    out = evaluate_predictions("regression", gaps)
    assert out["mean_gap"] == pytest.approx(0.0) and out["r_gap_age"] == pytest.approx(-1.0)
    assert out["mean_gap_corrected"] == pytest.approx(1 / 3)
    assert out["r_gap_corrected_age"] == pytest.approx(0.0, abs=1e-12)
    seg = tmp_path / "seg.tsv"
    pd.DataFrame(
        {
            "scan": ["a", "b"],
            "subject": ["a", "b"],
            "label": ["", ""],
            "dice_WT": [0.8, 0.6],
            "dice_TC": [0.5, 0.7],
            "dice_ET": [1.0, 0.0],
        }
    ).to_csv(seg, sep="\t", index=False)
    out = evaluate_predictions("segmentation", seg)
    assert out["dice_WT"] == pytest.approx(0.7) and out["dice_mean"] == pytest.approx(0.6)
    with pytest.raises(MedtxError, match=r"reg\.tsv: missing column\(s\) \['dice_WT'"):
        evaluate_predictions("segmentation", reg)


def test_cache_index_lists_each_scan_once_with_its_identity(tmp_path):
    from medtx.data.cache import read_cache_index, write_cache_index

    scans = ["sub-0", "sub-1_ses-2", "sub-2"]
    images = [str(tmp_path / f"{s}.npy") for s in scans]
    regions = [p.replace(".npy", "_regions.npy") for p in images]
    table = read_cache_index(write_cache_index("adni", scans, images, tmp_path / "i.tsv", regions))
    assert table["scan"].tolist() == scans
    assert table["regions"].tolist() == regions
    assert table["subject"].tolist() == ["0", "1", "2"]
    assert table["session"].tolist() == ["", "2", ""]
    assert set(table["dataset"]) == {"adni"}
    plain = read_cache_index(write_cache_index("adni", scans[:1], images[:1], tmp_path / "j.tsv"))
    assert plain["regions"].tolist() == [""]
    brats = read_cache_index(
        write_cache_index(
            "brats", ["BraTS20_Training_001"], images[:1], tmp_path / "b.tsv", brats=True
        )
    )
    assert brats["subject"].tolist() == ["BraTS20Training001"]
    with pytest.raises(MedtxError, match="2 scans but 3 cached images"):
        write_cache_index("adni", scans[:2], images, tmp_path / "k.tsv")


def test_the_workflows_cache_index_names_a_missing_cache_and_its_record(tmp_path):
    """A T1 job declares only its record, so a deleted cache is found by the index
    (the workflow passes its record list) and named with the file to force."""
    from medtx.data.cache import write_cache_index

    scans = ["sub-0", "sub-1", "sub-2"]
    images = [tmp_path / f"{s}.npy" for s in scans]
    for image in images:
        np.save(image, np.zeros((1, 2, 2, 2), np.float16))
    records = [str(tmp_path / s / f"{s}_provenance.json") for s in scans]
    record_list = tmp_path / "records.txt"
    record_list.write_text("".join(f"{r}\n" for r in records))

    def index(name, dataset="adni", regions=None, **kw):
        kw.setdefault("record_list", record_list)
        files = list(map(str, images))
        return write_cache_index(dataset, scans, files, tmp_path / name, regions, **kw)

    assert index("i.tsv").is_file()
    images[1].unlink()
    with pytest.raises(MedtxError) as err:
        index("j.tsv")
    assert str(err.value).startswith(f"{images[1]}: the training cache of scan sub-1 is missing")
    assert str(err.value).endswith(f"; run again with --forcerun {records[1]}: its job rebuilds it")
    with pytest.raises(MedtxError, match=f"missing; run again with --forcerun {images[1]}:"):
        index("b.tsv", "brats", brats=True)
    assert not (tmp_path / "j.tsv").exists()
    regions = [str(i).replace(".npy", "_regions.npy") for i in images]
    images[1].touch()
    with pytest.raises(MedtxError, match=r"sub-0_regions\.npy: the training cache of scan sub-0"):
        index("k.tsv", regions=regions)
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{r}\n" for r in records[:2]))
    with pytest.raises(MedtxError, match="3 scans but 2 provenance records"):
        index("l.tsv", record_list=short)
