"""Where each step's numbers and the samples go besides metrics.jsonl: TensorBoard and Weights & Biases (--report_to).

    torchrun --nproc_per_node 2 train.py --report_to tensorboard,wandb    # then: tensorboard --logdir out/tensorboard

Rank 0 writes, as it writes metrics.jsonl; the other ranks hold no backend. Per step: the training loss, LR, grad
norm, tokens/s and peak memory, and the eval loss when there is one (SCALARS); at each sampling, the samples as text.
Both backends are optional packages, imported only when named: one that is not installed is refused when the flags
are checked, with the pip command, and one that cannot start (W&B online without a login) is refused before the
model loads. A backend that fails later is turned off with a warning, and training goes on: every number is in
metrics.jsonl and samples.jsonl as well, and a dashboard must not end a run that is still training.

A resumed run continues the same curves, each step once:
    tensorboard  output_dir/tensorboard; the writer's purge_step makes TensorBoard drop the events of the steps after
                 the checkpoint that the interrupted attempt had logged, so the resumed attempt's steps replace them,
                 as in metrics.jsonl
    wandb        the run id is kept in each checkpoint (TrainerState.reporting) and the run resumed under it. A W&B
                 run's history only grows (W&B drops a step that is not past its last one), so the resumed attempt
                 logs from the step after the last one metrics.jsonl held before it was cut back: those steps keep
                 the interrupted attempt's values, equal to the resumed ones on CPU and within rounding on a GPU
"""
import importlib.util
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
           "peak_mem_gib": "train/peak_mem_gib", "eval_loss": "eval/loss"}  # metrics.jsonl key -> the curve's name


class TensorBoard:
    """Scalars and samples as TensorBoard events in output_dir/tensorboard, through torch.utils.tensorboard."""

    package = "tensorboard"  # what pip installs

    def __init__(self, out_dir: Path, config: dict, resumed_step: int, state: dict, logged_through: int):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard's reader drops this folder's events from purge_step on that were written before this writer's
        # (an interrupted attempt's steps after the checkpoint). Step 0 too: a run restarted from scratch replaces all.
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # every step, as metrics.jsonl: a killed run keeps the curve up to its last step

    def samples(self, step: int, records: list[dict]) -> None:
        self.writer.add_text("samples", "\n\n".join(f"**{r['prompt']}** -> {r['completion']}" for r in records), step)
        self.writer.flush()

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Scalars and a table of samples in a W&B run. WANDB_MODE=offline writes it under output_dir/wandb, for
    `wandb sync` later; the project and run name come from the flags, else WANDB_PROJECT and WANDB_NAME."""

    package = "wandb"

    def __init__(self, out_dir: Path, config: dict, resumed_step: int, state: dict, logged_through: int):
        import wandb

        self.wandb, run_id = wandb, state.get("wandb_run_id")
        self.run = wandb.init(project=config["wandb_project"] or None, name=config["wandb_name"] or None,
                              id=run_id, resume="allow" if run_id else None, dir=str(out_dir), config=config)
        # the steps that this run already has (module docstring); a new run has none, not even step 0 (the eval
        # loss before training)
        self.skip_through = logged_through if run_id else -1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step > self.skip_through:
            self.run.log(values, step=step)

    def samples(self, step: int, records: list[dict]) -> None:
        if step > self.skip_through:
            table = self.wandb.Table(columns=["prompt", "completion"],
                                     data=[[r["prompt"], r["completion"]] for r in records])
            self.run.log({"samples": table}, step=step)

    def state(self) -> dict:
        return {"wandb_run_id": self.run.id}

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB}  # the names --report_to takes


def parse(report_to: str) -> list[str]:
    """--report_to's names; an unknown one, or one whose package is not installed, is refused by name."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"--report_to {name!r} is not a backend: give {', '.join(BACKENDS)} (comma-separated), "
                             "or none")
    missing = [BACKENDS[n].package for n in names if importlib.util.find_spec(BACKENDS[n].package) is None]
    if missing:
        raise ValueError(f"--report_to {report_to} needs {' and '.join(missing)}, which is not installed here: "
                         f"pip install {' '.join(missing)}")
    return names


class Reporters:
    """The backends --report_to names, on rank 0 (none elsewhere); what each needs to resume, to keep in checkpoints."""

    def __init__(self, backends: dict, resumed_state: dict):
        self.backends, self.resumed_state = backends, resumed_state

    def step(self, m: dict) -> None:
        """One step's record, as metrics.jsonl has it."""
        values = {tag: m[key] for key, tag in SCALARS.items() if key in m}
        self._each(lambda backend: backend.scalars(m["step"], values), f"at step {m['step']}")

    def samples(self, step: int, records: list[dict]) -> None:
        if records:
            self._each(lambda backend: backend.samples(step, records), f"at step {step}'s samples")

    def state(self) -> dict:
        """The resumed checkpoint's state with each open backend's own over it: a run resumed without wandb still
        hands the W&B run id on to its checkpoints, for a later resume with it."""
        return {**self.resumed_state, **{k: v for b in self.backends.values() for k, v in b.state().items()}}

    def close(self) -> None:
        self._each(lambda backend: backend.close(), "while closing")
        self.backends = {}

    def _each(self, call, when: str) -> None:
        for name, backend in list(self.backends.items()):
            try:
                call(backend)
            except Exception as e:  # a dashboard's failure must not end training: metrics.jsonl has every step
                del self.backends[name]
                tqdm.write(f"warning: --report_to {name} failed {when} ({type(e).__name__}: {e}); it is off for the "
                           "rest of this run. metrics.jsonl and samples.jsonl have every step")


def open_reporters(names: list[str], out_dir: Path, config: dict, resumed_step: int, state: dict,
                   logged_through: int) -> Reporters:
    """Start the backends on rank 0, resuming their curves at `resumed_step` (0: a new run) with the checkpoint's
    `state`; `logged_through` is the last step an earlier attempt recorded. A collective: if a backend cannot start,
    every rank raises, before the model loads."""
    opened, error = {}, [None]
    if dist.get_rank() == 0:
        for name in names:
            try:
                opened[name] = BACKENDS[name](out_dir, config, resumed_step, state, logged_through)
            except Exception as e:  # W&B online without a login, an unwritable folder: refused before loading
                error[0] = (f"--report_to {name} could not start ({type(e).__name__}: {e})"
                            + ("; WANDB_MODE=offline logs locally without a login" if name == "wandb" else ""))
                break
    dist.broadcast_object_list(error, src=0)
    reporters = Reporters(opened, state)
    if error[0]:
        reporters.close()
        raise RuntimeError(error[0])
    return reporters
