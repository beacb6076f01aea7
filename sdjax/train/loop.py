"""`train(config, workdir)`: the training loop, resumable from its run directory.

The run directory holds:
    config.json        the resolved config (seed included)
    runs.jsonl         one line per start: git revision, start step, command, devices
    checkpoints/       orbax steps: state, data-iterator position, model fingerprint
    metrics.jsonl      per logging window: loss, grad_norm, learning_rate, steps_per_sec, skipped_images
    eval.jsonl         what the `evaluate` function given to train() returned, every eval_every steps
    samples/           sample grids (when enabled and the pipeline can generate)
    export/            the final weights (EMA by default) as a diffusers folder; a LoRA run's adapter files
    latent_cache/      VAE posteriors of the dataset (data.cache_latents)

Randomness is a function of (seed, step) only: step s uses fold_in(key(seed), s), the data order is drawn
from (seed, epoch). A checkpoint therefore restores everything a resumed run needs to repeat an
uninterrupted one exactly. SIGTERM / SIGINT end the loop after the current step with a checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from sdjax import distributed, parallel
from sdjax.errors import ConfigError, InvalidArgumentError, NonFiniteLossError
from sdjax.pipeline import Pipeline, load_pipeline
from sdjax.train import config as config_lib
from sdjax.train.adapters import lora_spec
from sdjax.train.checkpoint import CheckpointStore
from sdjax.train.config import TrainConfig
from sdjax.train.data import BatchIterator, ImageSource, scan_folder
from sdjax.train.export import export_run, save_sample_grid, swap_weights, trained_pipeline
from sdjax.train.latents import load_or_build
from sdjax.train.metrics import MetricsLog, truncate_after
from sdjax.train.state import (
    TrainState,
    checkpointed,
    create_state,
    learning_rate_schedule,
    make_optimizer,
    with_checkpointed,
)
from sdjax.train.step import make_train_step
from sdjax.train.task import Task, architectures, build_task, fingerprint

log = logging.getLogger("sdjax.train")

# Independent random streams derived from the seed.
_INIT_STREAM, _STEP_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int                       # the step the run ended at (== num_steps unless stopped)
    stopped_by_signal: str | None   # "SIGTERM" / "SIGINT" when a signal ended the run early
    export_dir: Path | None
    last_metrics: dict[str, float]
    state: TrainState               # the final state (for callers that keep working in this process)


class StopSignals:
    """While active, SIGTERM and SIGINT request a clean stop instead of killing the process; a second SIGINT
    interrupts at once (for a stuck run). Only the main thread can install handlers; elsewhere this is inert."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint", self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def git_revision() -> str:
    """The commit of the sdjax source tree in use, "+dirty" when it has local changes; "unknown" outside git."""
    source = Path(__file__).resolve().parent
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,
                                           timeout=10, check=True).stdout.strip()
        return run("rev-parse", "HEAD") + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_files(workdir: Path, config: TrainConfig, start_step: int, changed: list[str] = ()) -> None:
    """config.json (the run's settings) and a runs.jsonl line per start. A resume allowed to change settings
    keeps config.json as the run began and writes its own config.step_<N>.json, the changes listed in runs.jsonl."""
    text = json.dumps(config_lib.to_dict(config), indent=2) + "\n"
    (workdir / (f"config.step_{start_step}.json" if changed else "config.json")).write_text(text)
    entry = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "seed": config.seed, "git_revision": git_revision(), "start_step": start_step, "command": sys.argv,
             "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
             **({"changed_settings": list(changed)} if changed else {})}
    with (workdir / "runs.jsonl").open("a") as runs:
        runs.write(json.dumps(entry) + "\n")


# What a resumed run may change: when to log, keep, sample and evaluate, not what is trained.
BOOKKEEPING_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts",
                    "sample_steps", "sample_guidance_scale", "eval_every", "eval_raw_weights", "export_ema",
                    "mesh",  # the same run resumes on another mesh: the arithmetic is the same
                    "nonfinite",  # what a NaN step does, never what a finite one computes
                    "lora.export_formats")


def check_same_run(workdir: Path, config: TrainConfig, *, allow_changes: bool = False) -> list[str]:
    """The settings (other than bookkeeping) in which `config` differs from the config.json of the run in
    `workdir`; refused unless `allow_changes`: the result would mix two experiments."""
    path = workdir / "config.json"
    if not path.is_file():
        return []
    try:
        saved = config_lib.flatten(config_lib.from_dict(json.loads(path.read_text())))
    except (ValueError, ConfigError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); it records the run being resumed: restore it, or start "
                          f"a new --workdir") from None
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in config_lib.flatten(config).items()
               if key not in BOOKKEEPING_KEYS and saved.get(key) != value]
    if changed and not allow_changes:
        raise ConfigError(f"{workdir} holds a run trained with other settings ({'; '.join(changed)}); resume it "
                          f"with the settings of its config.json, train the new settings in a new --workdir, or "
                          f"go on with them on purpose (--allow-changed-settings: recorded in runs.jsonl, "
                          f"config.json kept)")
    if changed:
        log.warning("resuming %s with changed settings: %s", workdir, "; ".join(changed))
    return changed


def make_source(config: TrainConfig, workdir: Path, task: Task, records):
    """The examples of the run: decoded images, or cached VAE posteriors when data.cache_latents is on."""
    images = ImageSource(records, config.data.resolution, loss_masks=config.data.loss_mask)
    if not (config.data.cache_latents and task.encode_moments is not None):
        return images
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else workdir / "latent_cache"
    log.info("latent cache: %s", cache_dir)
    return load_or_build(images, task.encode_moments, task.initial_params["vae"], cache_dir,
                         random_flip=config.data.random_flip, batch_size=config.batch_size)


@dataclasses.dataclass
class _Run:
    """A started (or resumed) run: everything the loop needs."""
    base: Pipeline
    task: Task
    optimizer: optax.GradientTransformation
    store: CheckpointStore
    state: TrainState
    batches: BatchIterator
    skipped: set
    mesh: Any = None  # a (data, fsdp) mesh (sdjax.parallel), or None for one device
    changed: list[str] = dataclasses.field(default_factory=list)  # settings a resume was allowed to change


def _start(config: TrainConfig, workdir: Path, allow_changes: bool) -> _Run:
    """Validate, build the model, and restore the latest checkpoint. Bad data, a bad config or a checkpoint of
    another model fail here before anything in `workdir` is written."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a folder; give the run a folder of its own")
    if not config.model.pretrained:
        raise ConfigError("model.pretrained is empty: set it to a diffusers folder (e.g. --set "
                          "model.pretrained=path/to/stable-diffusion-v1-5)")
    mesh = training_mesh(config)
    owned_streams = data_streams(config, mesh)
    records = scan_folder(config.data.folder, require_captions=config.stage == "unet",
                          require_masks=config.data.loss_mask)
    log.info("loading the base model %s", config.model.pretrained)
    base = load_pipeline(config.model.pretrained)
    model = fingerprint(config, architectures(config, base))
    if config.lora.rank:  # lora.targets / text_encoder_targets matching no layer fail here, before any write
        lora_spec(config.lora, base.params)
    store = CheckpointStore(workdir / "checkpoints", keep=config.keep_checkpoints)
    store.check_model(model)  # before any init or write
    changed = check_same_run(workdir, config, allow_changes=allow_changes) if store.latest_step() is not None else []
    task = build_task(config, base, jax.random.fold_in(jax.random.key(config.seed), _INIT_STREAM))
    optimizer = make_optimizer(config.optimizer, config.num_steps)
    state = create_state(task.trainable, task.frozen, optimizer)
    source = make_source(config, workdir, task, records)
    batches = BatchIterator(source, config.batch_size, config.seed, random_flip=config.data.random_flip,
                            streams=owned_streams[0], owned=owned_streams[1])
    if mesh is not None:  # params, optimizer state and EMA placed by the sharding rules (and restored so)
        state = distributed.to_global(state, parallel.param_shardings(state, mesh))
    else:  # committed to the device, as a restored state is: both then lower to the same program, and a resume
        state = jax.device_put(state, jax.devices()[0])  # reads the first run's from the compilation cache
    latest = store.restore_latest(checkpointed(state))
    if latest is not None:
        _, restored, data_state = latest
        state = with_checkpointed(state, restored)
        batches.restore(data_state)
        log.info("resumed from step %d", int(state.step))
    return _Run(base, task, optimizer, store, state, batches, source.skipped, mesh, changed)


def data_streams(config: TrainConfig, mesh) -> tuple[int, range]:
    """(how many data streams, the ones this process reads): data.streams, by default one per process; each
    process reads its share, the rows of the global batch that its devices hold."""
    processes = jax.process_count()
    if processes > 1 and mesh is None:
        raise ConfigError(f"{processes} processes train one run on a mesh over all their devices: set "
                          f"mesh=data={jax.device_count()} (or a data/fsdp split of it)")
    if processes > 1 and config.data.cache_latents:
        raise ConfigError("data.cache_latents is not supported with several processes yet (each would write the "
                          "whole cache); turn it off")
    streams = config.data.streams or processes
    if streams % processes:
        raise ConfigError(f"data.streams = {streams} must be a multiple of the {processes} processes")
    share = streams // processes
    return streams, range(jax.process_index() * share, (jax.process_index() + 1) * share)


def data_position(batches: BatchIterator) -> dict:
    """The data position a checkpoint records: every process's streams (a collective with several processes)."""
    local = batches.state()
    if jax.process_count() == 1 or "streams" not in local:
        return local
    rows = distributed.gather_rows(np.asarray(local["streams"], np.int64))
    return {**local, "streams": rows.reshape(-1, 3).tolist()}


def training_mesh(config: TrainConfig):
    """The config's (data, fsdp) mesh, or None for one device; the batch must split evenly over it."""
    if not config.mesh:
        return None
    try:
        mesh = parallel.parse_mesh(config.mesh)
    except InvalidArgumentError as err:
        raise ConfigError(f"mesh: {err}") from None
    if config.batch_size % mesh.size:
        raise ConfigError(f"batch_size {config.batch_size} does not split over the mesh's {mesh.size} devices; "
                          f"use a multiple of {mesh.size}")
    return mesh


def train(config: TrainConfig, workdir: str | Path, *,
          evaluate: Callable[[Pipeline], dict[str, float]] | None = None,
          allow_changed_settings: bool = False) -> TrainResult:
    """Train (or resume) the run in `workdir` until config.num_steps or a stop signal. `evaluate`, when given, is
    called every config.eval_every steps with the pipeline holding the current weights (EMA, and raw too with
    config.eval_raw_weights); what it returns is appended to eval.jsonl with the step and the weights' name.
    A resume with other settings than the run's config.json is refused unless `allow_changed_settings`."""
    workdir = Path(workdir)
    # Installed first, so a stop requested while starting up also ends the run cleanly (before its first step).
    with StopSignals() as stop:
        run = _start(config, workdir, allow_changed_settings)
        state, task, start = run.state, run.task, int(run.state.step)
        primary = distributed.is_primary()  # the one process that writes the run's files
        metrics = MetricsLog(workdir, every=config.log_every, start_step=start, total_steps=config.num_steps,
                             host_metrics=_host_metrics(config, run.skipped), write=primary)
        if primary:
            truncate_after(workdir / "eval.jsonl", start)  # evaluations past the checkpoint are repeated
            write_run_files(workdir, config, start, run.changed)
        shardings = None if run.mesh is None else parallel.param_shardings(state.replace(frozen={}), run.mesh)
        train_step = make_train_step(task.loss_fn, run.optimizer, ema_decay=config.optimizer.ema_decay,
                                     grad_accumulation=config.optimizer.grad_accumulation, state_shardings=shardings)
        step_key = jax.random.fold_in(jax.random.key(config.seed), _STEP_STREAM)
        evaluating = evaluate is not None and config.eval_every > 0
        # One pipeline for sample grids and evaluations, so its compiled functions are reused; params are swapped in.
        # With several processes the weights are gathered to every host (all must take part) and process 0 uses
        # them alone.
        viewer = trained_pipeline(run.base, task, on_host(state.ema_params)) if config.sample_every or evaluating \
            else None

        def save(state):
            run.store.save(int(state.step), checkpointed(state), data_position(run.batches), task.fingerprint)

        step = start
        if step < config.num_steps:  # the first step compiles: minutes for a large model
            log.info("compiling the train step (%s trained) and starting at step %d",
                     ", ".join(task.fingerprint["trained"]), step)
        try:
            while step < config.num_steps and not stop.requested:
                batch = task.prepare_batch(next(run.batches))
                if run.mesh is not None:  # this process's rows, on its devices, of the global batch
                    batch = distributed.global_batch(batch, parallel.batch_sharding(run.mesh))
                state, step_metrics = train_step(state, batch, jax.random.fold_in(step_key, step))
                step += 1
                metrics.add(step, step_metrics)
                if config.nonfinite == "stop" and metrics.last.get("step") == step and metrics.last["nonfinite"]:
                    save(state)  # finite: the NaN/inf updates were dropped
                    raise NonFiniteLossError(
                        f"the loss or gradients were NaN/inf in {metrics.last['nonfinite']:.0%} of the steps up to "
                        f"step {step} (metrics.jsonl); their updates were dropped and checkpoint {step} holds the "
                        f"last finite state. Lower the learning rate or check the data, then rerun to resume; "
                        f"or set nonfinite=skip to step over them")
                if evaluating and step % config.eval_every == 0:  # before the checkpoint of the same step
                    weights = on_host({"ema": state.ema_params, **({"raw": state.params}
                                                                   if config.eval_raw_weights else {})})
                    if primary:
                        _evaluate(evaluate, viewer, task, weights, step, workdir / "eval.jsonl")
                if step % config.checkpoint_every == 0:
                    save(state)
                if config.sample_every and step % config.sample_every == 0:
                    weights = on_host(state.ema_params)
                    if primary:
                        save_sample_grid(swap_weights(viewer, task, weights),
                                         workdir / "samples" / f"step_{step:07d}.png", config.sample_prompts,
                                         size=config.data.resolution, steps=config.sample_steps,
                                         guidance_scale=config.sample_guidance_scale, seed=config.seed)
            metrics.flush(step)
            save(state)
        finally:
            run.store.wait()
            metrics.close()
    export_dir = None
    if step >= config.num_steps and not stop.requested:
        weights = on_host(state.ema_params if config.export_ema else state.params)
        export_dir = workdir / "export"
        if primary:
            export_run(run.base, task, weights, export_dir)
            log.info("exported %s weights to %s", "EMA" if config.export_ema else "raw", export_dir)
    run.store.close()
    return TrainResult(step, stop.requested, export_dir, metrics.last, state)


def on_host(params):
    """`params` whole on this host (gathered from every process: all must call it), or as they are with one."""
    return distributed.to_host(params) if jax.process_count() > 1 else params


def _evaluate(evaluate, viewer: Pipeline, task: Task, weights: dict, step: int, path: Path) -> None:
    with path.open("a") as rows:
        for name, params in weights.items():
            values = {key: float(value) for key, value in evaluate(swap_weights(viewer, task, params)).items()}
            rows.write(json.dumps({"step": step, "weights": name, **values}) + "\n")
    log.info("step %d: evaluated %s", step, " and ".join(weights))


def _host_metrics(config: TrainConfig, skipped: set):
    """Per-window values computed on the host: the learning rate of the last step and the skipped images."""
    schedule = learning_rate_schedule(config.optimizer, config.num_steps)
    return lambda step: {"learning_rate": float(schedule(step - 1)), "skipped_images": len(skipped)}
