"""The model commands: `models list|promote|rollback` (the registry), `train`, `calibrate` and `evaluate`.

chromobatch.cli registers the top-level commands (and the groups) on the app, in `chromobatch --help` order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from chromobatch.cli.main import DbOpt, friendly, setting_help, settings
from chromobatch.errors import ChromobatchError

models_app = typer.Typer(help="The model registry: candidates, the active model, promotion and rollback.",
                         no_args_is_help=True)


def _train_from_db(cfg: Any, db: str, *, models_dir: Path | None, margin: float, val_fraction: float,
                   lock: Path | None, promote: bool, progress: bool, warm_start: bool,
                   signed_only: bool = False) -> None:
    """`train --db`: retrain.retrain, with its own exit code when another run holds the lock."""
    from chromobatch.errors import TrainingLocked
    from chromobatch.registry.retrain import RetrainOptions, retrain
    from chromobatch.store.db import connect

    s = settings(db=db, models_dir=models_dir, train_lock=lock)
    database = connect(s.db)
    try:
        result = retrain(database, cfg, RetrainOptions(models_dir=Path(s.models_dir), margin=margin,
                                                       val_fraction=val_fraction,
                                                       lock_path=Path(s.train_lock) if s.train_lock else None,
                                                       promote=promote, warm_start=warm_start,
                                                       signed_only=signed_only),
                         progress=progress)
    except TrainingLocked as exc:
        typer.echo(f"skipped: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    finally:
        database.dispose()
    if result is None:  # a torchrun rank other than 0
        return
    d = result.data
    typer.echo(f"trained on {d['n_train']} chromosomes ({d['patients'] - d['val_patients']} patients), validated "
               f"on {d['n_val']} ({d['val_patients']} patients) in {result.seconds:.0f}s")
    typer.echo(f"model {result.name} {result.version} (id {result.version_id}) at {result.model_dir}: "
               f"{result.status} - {result.reason}")


@models_app.command("list")
@friendly
def models_list(db: DbOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with the history).")] = False
                ) -> None:
    """Every registered model version with its status, validation accuracy and reason."""
    from chromobatch.registry.promote import format_models, list_models
    from chromobatch.store.db import connect

    with connect(settings(db=db).db) as database:
        rows = list_models(database)
    typer.echo(json.dumps(rows, indent=2, default=str) if as_json else "\n".join(format_models(rows)))


@models_app.command("promote")
@friendly
def models_promote(
    version: Annotated[str, typer.Argument(help="Model id, version, name-version or sha256 prefix.")],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the registry).")] = None,
    db: DbOpt = None,
) -> None:
    """Make a model version the active one (watchers switch before their next case)."""
    from chromobatch.registry.promote import promote
    from chromobatch.store.db import connect

    with connect(settings(db=db).db) as database:
        row = promote(database, version, reason=reason)
    typer.echo(f"model {row.name} {row.version} (id {row.id}) is now active")


@models_app.command("rollback")
@friendly
def models_rollback(
    reason: Annotated[str | None, typer.Option(help="Why (kept in the registry).")] = None,
    stain: Annotated[str, typer.Option(help="The stain whose active model is rolled back: G or Q.")] = "G",
    db: DbOpt = None,
) -> None:
    """Re-activate the model that was active before the current one; the current one is retired."""
    from chromobatch.registry.promote import rollback
    from chromobatch.store.db import connect

    with connect(settings(db=db).db) as database:
        old, new = rollback(database, reason=reason, stain=stain)
    typer.echo(f"retired {old.name} {old.version} (id {old.id}); {new.name} {new.version} (id {new.id}) is "
               "active again")



class _TrainDefault:
    """The default of a `train` option: a TrainConfig field (dotted: augment.rotate_deg), read only when it is
    used (a run, `train --help`), since chromobatch.training imports torch and the other commands should not
    wait for it. click calls a callable default; Typer's help shows str() of one that is not a function."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self) -> Any:
        from chromobatch.training.config import TrainConfig

        return functools.reduce(getattr, self.field.split("."), TrainConfig())

    def __str__(self) -> str:
        return str(self())

    def __bool__(self) -> bool:  # the help of a --x/--no-x flag shows the side its default is on
        return bool(self())


def _default(field: str) -> Any:
    return _TrainDefault(field)


ModelsDirOpt = Annotated[Path | None, typer.Option("--models-dir", help=setting_help(
    "--db: registry folder for <name>-<timestamp>/.", "models_dir", show_default=True))]
TrainLockOpt = Annotated[Path | None, typer.Option("--lock", help=setting_help(
    "--db: lock file (default <sqlite>.train.lock or <models-dir>/.train.lock).", "train_lock"))]


def _check_train_args(data: Path | None, out: Path | None, db: str | None, *, resume: bool, warm_start: bool,
                      init_from: Path | None) -> None:
    if (data is None) == (db is None):
        raise ChromobatchError("give either --data (a manifest or class folders) or --db (train from the "
                               "database's labelled cases)", hint="See `chromobatch train --help`.")
    if db is not None and (out is not None or resume):
        raise ChromobatchError("--out and --resume are for --data; with --db the model goes to "
                               "--models-dir/<name>-<timestamp>")
    if data is not None and out is None:
        raise ChromobatchError("--data needs --out (the model folder to write)")
    if warm_start and db is None:
        raise ChromobatchError("--warm-start is for --db; with --data use --init-from MODEL_DIR")
    if warm_start and init_from is not None:
        raise ChromobatchError("give --warm-start (the active model) or --init-from, not both")


def _print_training(result: Any, backbone: str) -> None:
    best = "-" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.4f} (step {result.best_step})"
    typer.echo(f"trained {backbone}: {result.steps_done} steps in {result.seconds:.0f}s "
               f"({result.images_per_second:.0f} images/s), best val accuracy {best}, t={result.final_temperature:.2f}"
               f"{', stopped early' if result.stopped_early else ''}"
               f"{', stopped at the time budget' if result.out_of_time else ''}")
    if result.size_prior is not None:
        typer.echo(_prior_line(result.size_prior))
    typer.echo(f"model written to {result.model_dir}")


@friendly
def train(
    data: Annotated[Path | None, typer.Option("--data", help="Manifest CSV path,label[,patient,cell,split] or "
                                                             "DIR/<label>/")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Model folder to write (model.safetensors + "
                                                           "model.json).")] = None,
    backbone: Annotated[str, typer.Option(help="Any timm model name (random init, never downloaded).")]
    = _default("backbone"),
    input_size: Annotated[int, typer.Option("--input-size", help="Square input side in pixels.")]
    = _default("input_size"),
    embed_dim: Annotated[int, typer.Option("--embed-dim", help="Embedding size D.")] = _default("embed_dim"),
    steps: Annotated[int, typer.Option(help="Training steps (each: B1 + B2, 24 images each).")] = _default("steps"),
    no_scl: Annotated[bool, typer.Option("--no-scl", help="Baseline: lambda_con = 0, same sampler and steps.")]
    = _default("no_scl"),
    lambda_con: Annotated[float | None, typer.Option("--lambda-con", help="Weight of L_con (default 1).")] = None,
    lambda_cls: Annotated[float | None, typer.Option("--lambda-cls", help="Weight of L_cls (default 1; code: 2).")]
    = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate (warm-up, then cosine).")] = _default("lr"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = _default("seed"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.")] = False,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Warm start: begin from this model "
                         "folder's weights and preprocessing (fresh optimiser and schedule).")] = None,
    freeze: Annotated[str, typer.Option("--freeze", help="Comma-separated parameter-name prefixes to keep frozen "
                      "(e.g. backbone.conv1,backbone.bn1,backbone.layer1): a cheaper fine-tune of --init-from.")]
    = "",
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")]
    = _default("checkpoint_every"),
    val_every: Annotated[int, typer.Option("--val-every", help="Steps between validations.")] = _default("val_every"),
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping (0: never).")]
    = _default("patience"),
    preprocess: Annotated[str, typer.Option("--preprocess", help="fixed, cell or fit (see docs/results.md).")]
    = _default("preprocess"),
    size_power: Annotated[float, typer.Option("--size-power", help="fixed/cell: < 1 compresses the size range "
                          "(small chromosomes get more pixels, order kept); 1 = none.")] = _default("size_power"),
    orient: Annotated[str, typer.Option("--orient", help="none, or upright: turn each crop's long axis vertical "
                                                          "before the model (crops cut at any angle).")]
    = _default("orient"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = _default("device"),
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on a GPU, fp32 on a CPU), fp32, or bf16 (a "
                                                "GPU, or a CPU with AVX-512 BF16 or AMX).")] = _default("precision"),
    time_budget: Annotated[float | None, typer.Option("--time-budget", help="Minutes the training loop may run in all "
                           "(--resume counts the time already spent); the schedule anneals over whichever runs out "
                           "first, --steps or time.")] = None,
    variant: Annotated[str, typer.Option(help="paper (the text) or code (the authors' public code).")]
    = _default("variant"),
    rotate: Annotated[float, typer.Option(help="Random rotation augmentation in degrees (+-); 180 for crops in "
                                               "metaphase orientation.")] = _default("augment.rotate_deg"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    size_prior: Annotated[bool, typer.Option(help="After training, fit the size prior (relative DNA content per "
                          "class) on the training cells; kept only if it helps on the validation cells.")]
    = _default("size_prior"),
    db: Annotated[str | None, typer.Option("--db", help="Train from this database's reviewed/imported labels "
                                                        "instead of --data; registers (and may promote) the model.")]
    = None,
    models_dir: ModelsDirOpt = None,
    margin: Annotated[float, typer.Option(help="--db: promote when the candidate's validation accuracy is at most "
                                               "this many percentage points below the active model's.")] = 0.0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="--db: share of patients that validate.")]
    = 0.2,
    lock: TrainLockOpt = None,
    promote: Annotated[bool, typer.Option(help="--db: promote a good enough candidate (else register only).")]
    = True,
    warm_start: Annotated[bool, typer.Option("--warm-start", help="--db: fine-tune the active model (its "
                          "architecture and preprocessing) instead of training from random weights; with the plain "
                          "focal loss unless --lambda-con is given (few-label study, docs/results.md).")] = False,
    signed_only: Annotated[bool, typer.Option("--signed-only", help="--db: train on the cases signed off in the web "
                                                                    "review only (default: every labelled case).")]
    = False,
) -> None:
    """Train a classifier with supervised contrastive learning (torchrun-aware: same command, DDP).

    With --db: train on the lab's labelled cases, register a candidate, promote it if it is not worse than the
    active model (exit code 75 when another training run holds the lock)."""
    from chromobatch.training.config import TrainConfig
    from chromobatch.training.loop import train as run_training
    from chromobatch.training.records import AugmentConfig

    _check_train_args(data, out, db, resume=resume, warm_start=warm_start, init_from=init_from)
    cfg = TrainConfig(orient=orient, size_power=size_power, backbone=backbone, input_size=input_size,
                      embed_dim=embed_dim, steps=steps, no_scl=no_scl, lambda_con=lambda_con, lambda_cls=lambda_cls,
                      lr=lr, seed=seed, preprocess=preprocess, checkpoint_every=checkpoint_every, val_every=val_every,
                      patience=patience, device=device, variant=variant, augment=AugmentConfig(rotate_deg=rotate),
                      init_from=str(init_from) if init_from is not None else None, size_prior=size_prior,
                      freeze=tuple(freeze.split(",")), precision=precision,
                      time_budget_s=None if time_budget is None else time_budget * 60)
    if db is not None:
        _train_from_db(cfg, db, models_dir=models_dir, margin=margin, val_fraction=val_fraction, lock=lock,
                       promote=promote, progress=progress, warm_start=warm_start, signed_only=signed_only)
        return
    assert data is not None and out is not None
    _print_training(run_training(cfg, data, out, resume=resume, progress=progress), backbone)


def _prior_line(info: dict[str, Any]) -> str:
    if not info.get("weight"):
        return f"size prior: not used ({info.get('reason') or 'no gain on the validation cells'})"
    return (f"size prior: weight {info['weight']:g}, validation accuracy {info['val_accuracy_without']:.4f} -> "
            f"{info['val_accuracy_with']:.4f} ({info['val_n']} crops)")


@friendly
def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Model folder to add the size prior to (model.json is "
                                                        "rewritten; the weights stay).")],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV with patient/cell columns: train rows fit "
                                                      "the prior, val rows tune its weight.")],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fit a model's size prior on labelled cells (what `train` does at its end), e.g. for a model trained
    elsewhere. Without a split column, 10% of the cells tune the weight."""
    from chromobatch.ml.folders import read_meta
    from chromobatch.training.calibrate import calibrate as run_calibration
    from chromobatch.training.records import load_records, split_records

    read_meta(model)  # a wrong --model fails before the data is decoded
    train_recs, val_recs = split_records(load_records(data, splits=("train", "val")))
    typer.echo(_prior_line(run_calibration(model, train_recs, val_recs, device=device)))


@friendly
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model folder (model.safetensors + model.json).")],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV or DIR/<label>/*.png.")],
    split: Annotated[str, typer.Option(help="Split to evaluate when the data has a split column ('all': every row).")]
    = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the HTML report and figures.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    size_prior: Annotated[bool, typer.Option(help="Use the model's size prior, if it has one (--no-size-prior: "
                                                  "the image model alone).")] = True,
) -> None:
    """Accuracy, macro recall, macro AUC and a per-class table (plus report figures with --out)."""
    from chromobatch.training.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(model, data, out, split=split, device=device, size_prior=size_prior)
    auc = "-" if metrics["auc_macro"] is None else f"{metrics['auc_macro']:.4f}"
    typer.echo(f"{metrics['n']} images: accuracy {metrics['accuracy']:.4f}, "
               f"macro recall {metrics['recall_macro']:.4f}, macro AUC {auc}")
    for row in metrics["per_class"]:
        if row["n"]:
            typer.echo(f"  {row['class']:>2}  n={row['n']:<5} recall {row['recall']:.3f}")
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2))
        typer.echo(f"metrics written to {json_out}")
    if out is not None:
        typer.echo(f"report written to {metrics['report']}")

