"""The segmenter commands: `segment train` (a U-Net on annotated metaphases) and `segment evaluate` (instance
F1 / AP at IoU 0.5 and count error of a segmenter on a split), registered as the `segment` group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from chromobatch.cli.main import friendly

segment_app = typer.Typer(help="Whole metaphase images: train and measure the chromosome segmenters.",
                          no_args_is_help=True)


@segment_app.command("train")
@friendly
def segment_train(
    data: Annotated[Path, typer.Option("--data", help="Annotated metaphases: manifest.csv (image,annotation,split) "
                                       "with labelme polygons, e.g. the bioimlab-metaphase folder.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (model.safetensors + model.json).")],
    steps: Annotated[int, typer.Option(help="Training steps (batches of random crops).")] = 3000,
    synth: Annotated[int, typer.Option("--synth", help="Synthetic G-band spreads to render (under OUT/synth, "
                                       "reused if there) and mix in (0: none).")]
    = 0,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Wall-clock budget; stops early.")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads (keep low on a shared machine).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    val_every: Annotated[int, typer.Option("--val-every", help="Validate (and keep the best) every N steps.")]
    = 250,
    seed: Annotated[int, typer.Option()] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up, then cosine).")] = 2e-3,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Continue from this segmenter folder's "
                                                   "weights (fresh optimiser and schedule).")] = None,
    channels: Annotated[str | None, typer.Option(help="U-Net widths per level, e.g. 8,16,32,64,128 (default "
                                                 "8,16,32,64). With --init-from, deeper levels are added "
                                                 "to the start's and its levels are copied.")] = None,
) -> None:
    """Train the learned segmenter on the train split, keep the best on the val split."""
    from chromobatch.segment.train import SegTrainConfig, train_segmenter

    synth_dir: str | None = None
    if synth > 0:
        from chromobatch.segment.synthset import write_synth_set

        synth_dir = str(write_synth_set(out / "synth", synth, seed=seed))
    widths = SegTrainConfig.channels
    if channels:
        try:
            widths = tuple(int(c) for c in channels.split(","))
        except ValueError as exc:
            raise typer.BadParameter(f"--channels wants integers separated by commas, got {channels!r}") from exc
    cfg = SegTrainConfig(steps=steps, batch_size=batch_size, threads=threads, val_every=val_every, seed=seed,
                         time_budget_min=minutes, synth_dir=synth_dir, lr=lr,
                         init_from=str(init_from) if init_from is not None else None,
                         grow=bool(channels) and init_from is not None, channels=widths)
    result = train_segmenter(data, out, cfg, progress=typer.echo)
    typer.echo(f"wrote {out}: val {json.dumps(result['val'])}")


@segment_app.command("tune")
@friendly
def segment_tune(
    model: Annotated[Path, typer.Option("--model", help="A segmenter model folder (its model.json is updated).")],
    data: Annotated[Path, typer.Option("--data", help="Annotated metaphases (manifest.csv + labelme polygons).")],
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 1,
    remeasure_width: Annotated[bool, typer.Option("--remeasure-width/--keep-width",
                                                  help="Measure the training chromosome width again.")] = True,
) -> None:
    """Choose the post-processing thresholds on the val split and the cluster rule on the train split (what
    `train` does at its end)."""
    from chromobatch.segment.data import load_set
    from chromobatch.segment.train import retune

    train = load_set(data, "train")
    result = retune(model, load_set(data, "val"), threads=threads, train=train if remeasure_width else None,
                    progress=typer.echo, clusters_on=train)
    typer.echo(f"updated {model / 'model.json'}: {json.dumps(result['postprocess'])}")


@segment_app.command("evaluate")
@friendly
def segment_evaluate(
    model: Annotated[str, typer.Option("--model", help="'classical' or a segmenter model folder.")],
    data: Annotated[Path, typer.Option("--data", help="Annotated metaphases (manifest.csv + labelme polygons).")],
    split: Annotated[str, typer.Option(help="Manifest split to score.")] = "test",
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 2,
    per_image: Annotated[bool, typer.Option("--per-image", help="Also print each image's counts.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Instance F1, precision, recall and AP at IoU 0.5, exact / within +-1 count rates, mean abs count error,
    segmentation time per image."""
    from chromobatch.segment.evaluate import evaluate_segmenter
    from chromobatch.segment.factory import load_segmenter

    seg = load_segmenter(model, threads=threads)
    res = evaluate_segmenter(seg, data, split)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    if per_image:
        for row in res["per_image"]:
            typer.echo(f"{row['name']}: annotated {row['annotated']}, counted {row['count']}, "
                       f"matched {row['tp']}/{row['predicted']}, flagged {row['flagged']}")
    s = res["summary"]
    typer.echo(f"{res['segmenter']} on {res['data']} [{split}], {s['images']} images, {s['annotated']} chromosomes:")
    typer.echo(f"  instance F1@0.5 {s['f1']:.4f} (precision {s['precision']:.4f}, recall {s['recall']:.4f}), "
               f"AP@0.5 {s['ap50']:.4f}")
    typer.echo(f"  count exact {s['exact_count']:.1%}, within +-1 {s['count_within_1']:.1%}, "
               f"mean abs error {s['mean_abs_count_error']:.2f}; flagged clusters {s['flagged_clusters']}")
    typer.echo(f"  {res['seconds_per_image']:.3f} s per image ({threads} threads)")
