"""The benchmark engine: samples -> completions -> parsed predictions -> metrics -> files.

``run_suite`` predicts in batches with a backend and writes, in the output folder:

- ``predictions.jsonl``: one row per sample, in the suite's sample order::

      {"id": ..., "raw": <completion text>, "prediction": <parsed canonical prediction or null>,
       "parse_error": <reason or null>, "metrics": {<per-sample metrics>},
       "completions": [...]}            # only with best-of-K x M: all K*M texts

  Rows are appended (and flushed) batch by batch, so an interrupted run keeps what it did; a
  rerun skips the ids already there (``resume``).
- ``metrics.json``: the suite, model, backend, coordinate family, settings, package versions,
  the task's aggregate metrics, parse failures by reason, and timing.
- ``report.html`` (+ ``report_files/``): see :mod:`vlm_grpo_ma.bench.report`.

``score_predictions`` does the same from completions produced elsewhere (rows with an id and the
raw text), with no model loaded.  Both go through :func:`score_completions` and
:func:`finalize`, so scoring a run's own predictions file reproduces its metrics exactly.

Per-sample metrics are the reward (``reward`` and ``reward/<part>``), the task's metrics on the
sample alone (``task.metrics([pred], [sample])``, or ``task.sample_metrics(pred, sample)`` where a
task defines it) and, with K*M > 1 completions, ``reward_best_of_n`` and ``reward_mean_of_n``.
The aggregate metrics are always the task's metrics over all samples (COCO AP is computed over
the whole set, not averaged per image).

Data parallel: under ``torchrun`` / ``deepspeed`` (``RANK`` / ``WORLD_SIZE`` set) sample ``i`` goes
to rank ``i % WORLD_SIZE``; each rank writes ``predictions.rank<r>-of-<w>.jsonl``; after a
barrier (gloo) rank 0 merges them into ``predictions.jsonl`` and writes the metrics and report.

Determinism: greedy decoding is exact; sampling seeds each batch from ``generation.seed`` and the
batch's first sample index, so a run repeats exactly with the same batch size (a resumed sampled
run repeats exactly when it resumes at a batch boundary).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from vlm_grpo_ma.bench.suite import Suite
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.format import parse_exception_reason
from vlm_grpo_ma.models.family import ModelFamily
from vlm_grpo_ma.reward_guard import RewardGuard

__all__ = [
    "BenchError",
    "finalize",
    "jsonable",
    "load_samples",
    "make_task",
    "read_predictions",
    "resolve_family",
    "run_suite",
    "score_completions",
    "score_predictions",
]

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RUN_INFO = "run.json"
_RAW_KEYS = ("raw", "text", "output", "response", "completion", "answer")


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (wrong output folder, unknown ids, ...)."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (dataclasses, tuples, numpy values and arrays converted;
    non-finite floats kept as floats, which ``json`` writes as NaN / Infinity)."""
    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return repr(obj)


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("vlm-grpo-ma", "torch", "transformers", "tokenizers", "pycocotools", "shapely", "math-verify",
                "qwen-vl-utils", "pillow", "numpy", "vllm", "deepspeed"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Rows of a predictions JSONL file.  A malformed LAST line (a run killed mid-write) is
    dropped; a malformed line elsewhere is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise BenchError(f"{p}:line {i}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict) or "id" not in row:
            raise BenchError(f"{p}:line {i}: field 'id': a prediction row must be an object with an id")
        rows.append(row)
    return rows


def _repair(path: Path) -> None:
    """Drop a partly written last row (a run killed mid-write) so that appending stays valid."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            complete = f.read(1) == b"\n"
        if not complete:
            _write_rows(path, read_predictions(path))


def _write_rows(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(jsonable(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# data and family
# ---------------------------------------------------------------------------------------------
def make_task(suite: Suite) -> Any:
    """The suite's task instance, with its prompt variant or prompt file applied.

    A ``prompt_file`` replaces the task's templates through ``task.set_prompt_template(text)``
    (the geometric tasks have it); a task without it refuses one.
    """
    from vlm_grpo_ma.task import get_task

    task = get_task(suite.task, **suite.task_kwargs())
    if suite.prompt_variant and hasattr(task, "prompt_variant"):
        task.prompt_variant = suite.prompt_variant
    if suite.prompt_file:
        if not hasattr(task, "set_prompt_template"):
            raise BenchError(f"suite {suite.name}: task {suite.task!r} has no set_prompt_template(); "
                             "it cannot take a prompt_file")
        task.set_prompt_template(Path(suite.prompt_file).read_text(encoding="utf-8"))
    return task


def load_samples(suite: Suite, task: Any = None, limit: int | None = None) -> list[Sample]:
    """The suite's samples (first ``limit``), with unique ids."""
    from vlm_grpo_ma.bench.formats import load_format

    d = suite.data
    n_limit = limit if limit is not None else suite.limit
    if d.format == "synthetic":
        if task is None:
            task = make_task(suite)
        n = d.n if n_limit is None else min(d.n, int(n_limit))
        samples = list(task.synthetic(n, seed=d.seed))
    else:
        kw = dict(d.options)
        if d.format == "jsonl":
            kw.setdefault("task", suite.task)
        samples = load_format(d.format, d.path, image_root=d.image_root, split=d.split, limit=n_limit, **kw)
    if n_limit is not None:
        samples = samples[: int(n_limit)]
    seen: dict[str, int] = {}
    check = getattr(task, "check_sample", None)
    for i, s in enumerate(samples):
        if s.id in seen:
            raise BenchError(f"suite {suite.name}: sample id {s.id!r} repeats (records {seen[s.id]} and {i})")
        seen[s.id] = i
        if check is not None:  # bad data fails here, before any generation, not at scoring time
            try:
                check(s)
            except ValueError as e:
                raise BenchError(f"suite {suite.name}: record {i} ({s.meta.get('source', d.path)}): {e}") from None
    return samples


def resolve_family(name: str | None, base: ModelFamily | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ModelFamily:
    """The coordinate family: ``name`` (a family or model_type) with ``base``'s processor
    parameters, or ``base`` itself; pixel bounds override both."""
    if name:
        if base is not None:
            fam = ModelFamily.from_model_type(name, patch_size=base.patch_size, merge_size=base.merge_size,
                                              min_pixels=base.min_pixels, max_pixels=base.max_pixels)
        else:
            fam = ModelFamily.from_model_type(name)
    elif base is not None:
        fam = base
    else:
        fam = ModelFamily.from_model_type("qwen2_5_vl")
    return fam.with_pixels(min_pixels, max_pixels)


# ---------------------------------------------------------------------------------------------
# scoring one sample
# ---------------------------------------------------------------------------------------------
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _answer_text(completion: str, strict: bool) -> str:
    """The text inside ``<answer>`` under the format rule (ParseError otherwise); lenient mode
    (for outputs of systems that do not follow it) takes the last answer block, or the whole
    text without think blocks."""
    from vlm_grpo_ma.format import check_format, split_completion, strip_end_tokens

    if strict:
        thought, answer = split_completion(completion)
        return check_format(thought, answer)
    from vlm_grpo_ma.task import ParseError

    text = strip_end_tokens(completion)
    blocks = _ANSWER_BLOCK.findall(text)
    inner = (blocks[-1] if blocks else _THINK_BLOCK.sub("", text)).strip()
    if not inner:
        raise ParseError("empty", "empty answer")
    return inner


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rewards(guard: RewardGuard, completions: Sequence[str], sample: Sample,
             family: ModelFamily) -> list[tuple[float, dict, str | None]]:
    """(total, finite parts, reason) of each completion, through the core's reward guard (the
    task's ``reward_batch`` where it has one)."""
    from vlm_grpo_ma.format import split_completion

    rs = guard.batch([(*split_completion(c), sample, family) for c in completions])
    return [(float(r.total), {k: float(v) for k, v in (r.parts or {}).items() if _finite(v)}, r.reason) for r in rs]


def parse_completion(task: Any, completion: str, sample: Sample, family: ModelFamily,
                     strict: bool = True) -> tuple[Any, str | None]:
    """(canonical prediction or None, parse-failure reason or None).  Never raises."""
    from vlm_grpo_ma.task import ParseError

    try:
        inner = _answer_text(completion, strict)
        return task.parse(inner, sample, family), None
    except ParseError as e:
        return None, e.reason
    except Exception as e:
        return None, parse_exception_reason(e)


def sample_metrics(task: Any, prediction: Any, sample: Sample) -> dict[str, float]:
    """The task's metrics on one sample (``task.sample_metrics`` where defined)."""
    try:
        if hasattr(task, "sample_metrics"):
            m = task.sample_metrics(prediction, sample)
        else:
            m = task.metrics([prediction], [sample])
    except Exception as e:  # a task bug on one odd prediction must not end a long run
        warnings.warn(f"{type(task).__name__}.metrics failed on sample {sample.id!r}: {type(e).__name__}: {e}")
        return {}
    return {k: float(v) for k, v in (m or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def score_completions(task: Any, sample: Sample, family: ModelFamily, completions: Sequence[str],
                      strict: bool = True, guard: RewardGuard | None = None) -> dict:
    """One prediction row from a sample's completions (the first is the prediction; all are
    rewarded for best-of-n).  Never raises on model output.  ``guard``: the run's
    :class:`~vlm_grpo_ma.reward_guard.RewardGuard` (it counts reward errors over the run)."""
    completions = [c if isinstance(c, str) else "" for c in completions] or [""]
    raw = completions[0]
    pred, reason = parse_completion(task, raw, sample, family, strict)
    rewards = _rewards(guard or RewardGuard(task), completions, sample, family)
    total, parts, _ = rewards[0]
    metrics: dict[str, float] = {"reward": total}
    metrics.update({f"reward/{k}": v for k, v in parts.items()})
    metrics.update(sample_metrics(task, pred, sample))
    if len(completions) > 1:
        totals = [r[0] for r in rewards]
        metrics["reward_best_of_n"] = max(totals)
        metrics["reward_mean_of_n"] = sum(totals) / len(totals)
        if hasattr(task, "completion_passed"):  # pass@k: how many of the n completions pass
            metrics["n_completions"] = float(len(completions))
            metrics["n_passed"] = float(sum(bool(task.completion_passed(r[1])) for r in rewards))
    row = {"id": sample.id, "raw": raw, "prediction": jsonable(pred), "parse_error": reason, "metrics": metrics}
    if len(completions) > 1:
        row["completions"] = list(completions)
    return row


def _pass_at_k(task: Any, suite: Suite, samples: Sequence[Sample], by_id: dict, summary: dict) -> dict:
    """Unbiased pass@k (the task's ``pass_at_k_metrics``) when n > 1 completions per sample
    were drawn; a sample without a row counts as n completions, none passing.  The task's
    first-completion ``pass@1`` is kept as ``pass@1_first_completion``."""
    if not hasattr(task, "pass_at_k_metrics") or not samples:
        return {}
    drawn = [((by_id.get(s.id) or {}).get("metrics") or {}).get("n_completions", 1) for s in samples]
    n_draw = max([suite.generation.num_samples] + [int(v) for v in drawn if _finite(v)])
    if n_draw < 2:
        return {}
    ns, cs = [], []
    for s in samples:
        m = (by_id.get(s.id) or {}).get("metrics") or {}
        ns.append(int(m.get("n_completions", n_draw)))
        cs.append(int(m.get("n_passed", 0)))
    out = dict(task.pass_at_k_metrics(ns, cs))
    if "pass@1" in out and "pass@1" in summary:
        out["pass@1_first_completion"] = summary["pass@1"]
    return out


def _row_completions(row: dict) -> list[str]:
    if isinstance(row.get("completions"), list) and row["completions"]:
        return [c if isinstance(c, str) else "" for c in row["completions"]]
    for k in _RAW_KEYS:
        if k in row and isinstance(row[k], str):
            return [row[k]]
    return [""]


# ---------------------------------------------------------------------------------------------
# aggregate, metrics.json and report
# ---------------------------------------------------------------------------------------------
def finalize(out_dir: str | os.PathLike, suite: Suite, task: Any, samples: Sequence[Sample], rows: Sequence[dict],
             family: ModelFamily, info: dict[str, Any], strict: bool = True, report: bool = True) -> dict:
    """Aggregate metrics over ``rows`` (re-parsed from their raw text), write metrics.json and
    report.html; returns the metrics.json content."""
    out = Path(out_dir)
    by_id = {r["id"]: r for r in rows}
    preds, reasons = [], Counter()
    for s in samples:
        r = by_id.get(s.id)
        pred, reason = (None, "missing") if r is None else parse_completion(task, _row_completions(r)[0], s, family, strict)
        preds.append(pred)
        if reason:
            reasons[reason] += 1
    task_metrics = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                    for k, v in (task.metrics(preds, list(samples)) or {}).items()}
    summary: dict[str, Any] = dict(task_metrics)
    n = len(samples)
    summary["n_samples"] = n
    summary["format_rate"] = (n - sum(reasons.values())) / n if n else 0.0
    for key in ("reward", "reward_best_of_n", "reward_mean_of_n"):
        vals = [by_id[s.id]["metrics"].get(key) for s in samples if s.id in by_id and by_id[s.id].get("metrics")]
        vals = [v for v in vals if _finite(v)]
        if vals:
            summary[f"{key}_mean"] = sum(vals) / len(vals)
    summary.update(_pass_at_k(task, suite, samples, by_id, summary))
    gen = dataclasses.asdict(suite.generation)
    result = {
        "suite": suite.name,
        "task": suite.task,
        "split": suite.data.split,
        "data": dataclasses.asdict(suite.data),
        "model": info.get("model"),
        "backend": info.get("backend"),
        "family": dataclasses.asdict(family),
        "generation": gen,
        "strict_format": strict,
        "n_samples": n,
        "metrics": summary,
        "parse_failures": dict(sorted(reasons.items())),
        "suite_config": jsonable(suite.to_dict()),
        "versions": versions(),
        "finished": _now(),
        **{k: v for k, v in info.items() if k not in ("model", "backend")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text(json.dumps(jsonable(result), indent=2, ensure_ascii=False), encoding="utf-8")
    if report:
        from vlm_grpo_ma.bench.report import write_report

        settings = {
            "suite": f"{suite.name} ({suite.source or 'in code'})",
            "task": suite.task,
            "data": f"{suite.data.format} {suite.data.path or ''} split={suite.data.split}".strip(),
            "model": info.get("model"),
            "backend": info.get("backend"),
            "coordinate family": f"{family.name} ({family.frame}, patch {family.patch_size}, "
                                 f"pixels {family.min_pixels}..{family.max_pixels})",
            "generation": ", ".join(f"{k}={v}" for k, v in gen.items()),
            "strict format": strict,
            "finished": result["finished"],
        }
        for k in ("load_s", "elapsed_s", "samples_per_s", "world_size"):
            if k in info:
                settings[k] = info[k]
        ordered_rows = [by_id[s.id] for s in samples if s.id in by_id]
        write_report(
            out,
            title=f"{suite.name}: {info.get('model') or 'external predictions'}",
            summary={**summary, "parse failures": dict(reasons)},
            key_metrics=list(suite.metrics) or list(task_metrics)[:4],
            settings=settings,
            versions=result["versions"],
            rows=ordered_rows,
            samples={s.id: s for s in samples},
            task=suite.task,
        )
    return result


# ---------------------------------------------------------------------------------------------
# distributed helpers (gloo is enough: only barriers)
# ---------------------------------------------------------------------------------------------
def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _init_dist(world: int) -> bool:
    """Initialise a gloo group for the barriers when launched with several ranks; returns
    whether this call created it."""
    if world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
def _batch_seed(seed: int, first_index: int) -> int:
    h = hashlib.sha256(f"{seed}:{first_index}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _check_run_info(out: Path, info: dict) -> None:
    p = out / RUN_INFO
    if not p.is_file():
        return
    old = json.loads(p.read_text(encoding="utf-8"))
    for key in ("suite", "model", "generation", "family"):
        if key in old and old.get(key) != info.get(key):
            raise BenchError(
                f"{out} holds predictions of another run ({key}: {old.get(key)!r} != {info.get(key)!r}); "
                "use another --output, or --fresh to start over"
            )


def run_suite(
    suite: Suite,
    model: str,
    output_dir: str | os.PathLike,
    *,
    backend: str = "hf",
    limit: int | None = None,
    batch_size: int | None = None,
    fresh: bool = False,
    report: bool = True,
    backend_obj: Any = None,
    max_samples_this_run: int | None = None,
    strict: bool = True,
) -> dict | None:
    """Run ``suite`` with ``model``; write predictions, metrics and report into ``output_dir``.

    Args:
        backend: ``hf`` or ``vllm`` (ignored when ``backend_obj`` is given).
        limit: evaluate only the first N samples (overrides the suite's ``limit``).
        batch_size: prompts per generation call (overrides the suite's).
        fresh: delete earlier predictions in ``output_dir`` instead of resuming.
        backend_obj: an already-built backend (tests, notebooks).
        max_samples_this_run: stop after predicting this many new samples (simulates an
            interruption in tests; the run then returns None without finalising; one process only).
        strict: apply the format rule (think then answer) when parsing.

    Returns:
        the metrics.json content on rank 0 once every sample is predicted, else None.
    """
    rank, world = _dist_env()
    created = _init_dist(world)
    try:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        task = make_task(suite)
        guard = RewardGuard(task)
        samples = load_samples(suite, task, limit)
        gen = dataclasses.replace(suite.generation, **({"batch_size": batch_size} if batch_size else {}))
        merged, shard_file = _prediction_files(out, rank, world, fresh)
        _barrier(world)

        index = {s.id: i for i, s in enumerate(samples)}
        shard, todo = _todo(samples, merged, shard_file, rank, world)

        t_load = time.time()
        be, family = backend_obj, None
        if todo or not (out / RUN_INFO).is_file():
            be, family = _start_backend(suite, model, backend, be, task, gen, out, rank)
        load_s = time.time() - t_load
        t0 = time.time()
        n_new = 0
        if todo:
            n_new = _predict(task, guard, be, family, gen, suite.name, shard, todo, index, shard_file, rank, strict,
                             max_samples_this_run)
        elapsed = time.time() - t0
        if max_samples_this_run is not None and n_new < len(todo):
            return None

        _barrier(world)
        if rank != 0:
            return None
        ordered = _merge_predictions(out, merged, samples, index)
        if family is None:
            family = ModelFamily(**json.loads((out / RUN_INFO).read_text(encoding="utf-8"))["family"])
        info = {"model": model, "backend": getattr(be, "name", backend) if be is not None else backend,
                "world_size": world, "load_s": round(load_s, 3), "elapsed_s": round(elapsed, 3)}
        if n_new:  # generation + scoring throughput of this call (model loading excluded)
            info["samples_per_s"] = round(n_new * world / elapsed, 4) if elapsed > 0 else None
        return finalize(out, suite, task, samples, ordered, family, info, strict=strict, report=report)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prediction_files(out: Path, rank: int, world: int, fresh: bool) -> tuple[Path, Path]:
    """``(merged, shard)``: the run's ``predictions.jsonl`` and the file this rank appends to (the
    same one on a single process).  ``fresh``: rank 0 deletes earlier predictions and run.json."""
    merged = out / PREDICTIONS
    shard_file = merged if world == 1 else out / f"predictions.rank{rank}-of-{world}.jsonl"
    if fresh and rank == 0:
        for p in [merged, out / RUN_INFO, *out.glob("predictions.rank*.jsonl")]:
            p.unlink(missing_ok=True)
    return merged, shard_file


def _todo(samples: Sequence[Sample], merged: Path, shard_file: Path, rank: int,
          world: int) -> tuple[list[Sample], list[Sample]]:
    """``(shard, todo)``: this rank's samples (every ``world``-th from ``rank``) and those of them
    with no row yet in ``merged`` or ``shard_file``."""
    done = {r["id"] for r in read_predictions(merged)} | {r["id"] for r in read_predictions(shard_file)}
    shard = [s for i, s in enumerate(samples) if i % world == rank]
    todo = [s for s in shard if s.id not in done]
    return shard, todo


def _start_backend(suite: Suite, model: str, backend: str, be: Any, task: Any, gen: Any, out: Path,
                   rank: int) -> tuple[Any, ModelFamily]:
    """``(backend, family)``: ``be``, or the ``backend`` named, loaded with ``model``, and the
    coordinate family.  The run's identity (suite, model, backend, generation, family) must match
    ``run.json`` in ``out`` if there is one (BenchError otherwise); rank 0 (re)writes it."""
    if be is None:
        from vlm_grpo_ma.bench.backends import load_backend

        be = load_backend(backend, model, task=task, min_pixels=suite.min_pixels, max_pixels=suite.max_pixels)
    family = resolve_family(suite.family, be.family, suite.min_pixels, suite.max_pixels)
    info = {"suite": suite.name, "model": model, "backend": getattr(be, "name", backend),
            "generation": dataclasses.asdict(dataclasses.replace(gen, batch_size=1)),
            "family": dataclasses.asdict(family)}
    _check_run_info(out, info)
    if rank == 0:
        tmp = out / (RUN_INFO + ".tmp")
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
        os.replace(tmp, out / RUN_INFO)
    return be, family


def _predict(task: Any, guard: RewardGuard, be: Any, family: ModelFamily, gen: Any, desc: str,
             shard: Sequence[Sample], todo: Sequence[Sample], index: dict[str, int], shard_file: Path, rank: int,
             strict: bool, max_samples: int | None) -> int:
    """Predict and score ``todo`` (the rest of this rank's ``shard``) in batches of
    ``gen.batch_size``, appending each batch's rows to ``shard_file`` (flushed) under a progress
    bar (rank 0's, named ``desc``); ``index``: sample id -> index in the suite (a batch's sampling
    seed).  Stops after ``max_samples`` new samples if given; returns how many were predicted."""
    import torch
    from tqdm.auto import tqdm

    _repair(shard_file)
    torch.manual_seed(gen.seed)
    bar = tqdm(total=len(shard), initial=len(shard) - len(todo), unit="sample", dynamic_ncols=True,
               desc=f"{desc}", disable=rank != 0)
    rewards: list[float] = []
    n_new = 0
    with shard_file.open("a", encoding="utf-8") as f:
        for batch in _batches(todo, gen.batch_size, max_samples):
            messages = [task.messages(s, family) for s in batch]
            texts = be.complete(batch, messages, gen, _batch_seed(gen.seed, index[batch[0].id]))
            for s, comps in zip(batch, texts):
                row = score_completions(task, s, family, comps, strict, guard)
                f.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
                rewards.append(row["metrics"]["reward"])
            f.flush()
            n_new += len(batch)
            bar.update(len(batch))
            bar.set_postfix(reward=f"{sum(rewards) / len(rewards):.3f}")
    bar.close()
    return n_new


def _batches(todo: Sequence[Sample], size: int, max_samples: int | None) -> Iterator[list[Sample]]:
    """Consecutive batches of ``size`` samples of ``todo``; with ``max_samples``, only that many
    samples in all (the last batch cut short)."""
    n = 0
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        if max_samples is not None and n + len(batch) > max_samples:
            batch = batch[: max(0, max_samples - n)]
            if not batch:
                return
        yield batch
        n += len(batch)
        if max_samples is not None and n >= max_samples:
            return


def _merge_predictions(out: Path, merged: Path, samples: Sequence[Sample], index: dict[str, int]) -> list[dict]:
    """Merge the ranks' files into ``merged`` (rows in the suite's order, then rows of samples
    outside this run, kept from an earlier run with a larger ``--limit``) and delete them;
    returns the rows of ``samples`` (those the metrics and report cover), in order."""
    rows = {r["id"]: r for r in read_predictions(merged)}
    for p in sorted(out.glob("predictions.rank*.jsonl")):
        rows.update({r["id"]: r for r in read_predictions(p)})
    ordered = [rows[s.id] for s in samples if s.id in rows]
    extra = [r for i, r in rows.items() if i not in index]
    _write_rows(merged, ordered + extra)
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    return ordered


# ---------------------------------------------------------------------------------------------
# score external predictions
# ---------------------------------------------------------------------------------------------
def score_predictions(
    suite: Suite,
    predictions: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    family: str | None = None,
    limit: int | None = None,
    strict: bool = True,
    report: bool = True,
    model_label: str | None = None,
) -> dict:
    """Score completions produced elsewhere: a JSONL of ``{"id": ..., "raw": "..."}`` rows (``text``,
    ``output``, ``response`` or ``completion`` also name the text; ``completions`` a list for
    best-of-n).  No model is loaded.

    The coordinate family is ``family`` if given, else the one recorded in a ``run.json`` beside
    the predictions file (re-scoring a run of this tool), else the suite's, else Qwen2.5-VL with
    its released processor's pixel bounds.  Samples without a row count as parse failures
    (``missing``); a row whose id is not in the suite is an error.
    """
    pred_path = Path(predictions)
    if not pred_path.is_file():
        raise BenchError(f"predictions file {pred_path} does not exist")
    rows_in = read_predictions(pred_path)
    task = make_task(suite)
    samples = load_samples(suite, task, limit)
    ids = {s.id for s in samples}
    unknown = [r["id"] for r in rows_in if str(r["id"]) not in ids]
    if unknown and limit is None and suite.limit is None:
        raise BenchError(f"{pred_path}: {len(unknown)} id(s) are not in suite {suite.name}, e.g. {unknown[:3]}")
    run_info = pred_path.parent / RUN_INFO
    if family:
        fam = resolve_family(family, None, suite.min_pixels, suite.max_pixels)
    elif run_info.is_file():
        fam = ModelFamily(**json.loads(run_info.read_text(encoding="utf-8"))["family"])
    else:
        fam = resolve_family(suite.family, None, suite.min_pixels, suite.max_pixels)
    by_id = {str(r["id"]): r for r in rows_in}
    guard = RewardGuard(task)
    rows = [score_completions(task, s, fam, _row_completions(by_id[s.id]), strict, guard)
            for s in samples if s.id in by_id]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != pred_path.parent.resolve() or pred_path.name != PREDICTIONS:
        _write_rows(out / PREDICTIONS, rows)
    else:
        _write_rows(out / "predictions.scored.jsonl", rows)
    info = {"model": model_label or f"external: {pred_path}", "backend": "none (score)", "predictions_file": str(pred_path)}
    return finalize(out, suite, task, samples, rows, fam, info, strict=strict, report=report)
