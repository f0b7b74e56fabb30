r"""The training layout of a tree rollout: each thought's tokens are trained once.

A tree of B prompts x K thoughts x M answers has ``sum T_bk + sum A_bkm`` unique generated
tokens. The three layouts below produce the per-token log-probs of exactly these tokens, in one
canonical flat order (the order of ``vlm_grpo_ma.algorithms.expand_to_tokens``)::

    for b in prompts: for k in thoughts: [T_bk thought tokens], [A_bk0 answer tokens], ..., [A_bk(M-1)]

so the sampler's log-probs (``batch.rollout_logp``) and the objective's per-token terms
(``algorithms.grpo_ma.token_terms``: thought tokens take ``A^T_bk``, answer tokens ``A^A_bkm``,
in the same order) line up with ``score_tokens(model, batch)``, and the GRPO-MA loss is the same
whichever layout computed the log-probs. This module only lays tokens out: no advantage or weight
is computed here.

``naive``: K*M rows ``prompt + thought_k + answer_km`` (right-padded, 2D attention mask). The
    thought is recomputed in each of its M rows but its tokens are read (trained) from the row
    m = 0 only, so they count once.
``packed``: one row per thought, ``prompt + thought_k + answer_k0 + ... + answer_k(M-1)``, with a
    4D attention mask [R, 1, L, L]: the prompt and thought are causal as usual, each answer
    attends to the whole prompt + thought and causally to itself, never to a sibling answer.
    Position ids restart for each answer at the end of the thought, so every answer sees the
    positions it was sampled with. The first token of every answer is predicted from the logits
    at the thought's last position (``</think>``), shared by the M answers. The prompt (and its
    image, through the vision tower) is still computed K times.
``tree`` (the default): one row per prompt, the whole tree in it::

        prompt, thought_0, answer_00 .. answer_0(M-1), thought_1, answer_10 .. , thought_(K-1), ..

    with a 4D mask: the prompt is causal, each thought attends to the prompt and causally to
    itself (never to a sibling thought), each answer to the prompt, its own thought and causally
    to itself. Every thought's positions continue from the prompt's end and every answer's from
    its thought's end, as they were sampled; the first token of every thought is predicted from
    the prompt's last position. The prompt and its images are computed once per prompt: the
    forward computes exactly the tree's unique tokens (plus the padding of shorter rows).

Positions are mRoPE [3, R, L]: the prompt's come from the model's own ``get_rope_index`` (image
tokens get their temporal/height/width grid positions) and generated tokens continue with the
text position ``max(prompt positions) + 1 + i`` on all three rows, exactly as in the rollout.
They are passed with 3 rows, never the 4-row form with a leading text row: from that form
transformers would derive its own packed-sequence mask, while here the 4D mask says it all.
``mm_token_type_ids`` is the prompt's, extended with zeros over generated tokens (without it
Qwen2.5-VL silently falls back to 1D positions).

The 4D mask is passed as a boolean mask to SDPA and as an additive float mask to eager
attention. transformers 5.x takes a 4D mask as it is (``masking_utils``: a 4D tensor or a
FlexAttention ``BlockMask`` skips the mask construction), and the Qwen-VL models take position ids
[3, R, L] (mRoPE) or [4, R, L] (a leading text row, used only to build a mask when none is given).
Why SDPA with a boolean mask: its fused kernels (the CPU flash kernel; on CUDA the
memory-efficient one, which takes arbitrary masks since PyTorch 2.1, pytorch/pytorch#96099,
while the flash kernel takes none; not measured here, no GPU) never materialise the [heads, L, L]
scores, so the only L x L tensors are the mask itself (one byte per query-key pair per row, and
SDPA's additive copy of it). Measured on the CPU (``benchmarks/layout_cost.py``, a 2-layer
Qwen2.5-VL of half the 3B's widths, one 256-token image, T16A1 with 100-token thoughts and
20-token answers, rows of 2,255 tokens): the tree's forward + backward took 1.10x the CPU time of
the same tokens under plain causal attention (no mask) and 1.07x its peak memory, against 4.2x the
time and 3.7x the memory for ``packed``. FlexAttention's block mask would also skip the masked
blocks (attention FLOPs, a small share at these lengths), but needs ``torch.compile`` and
recompiles per shape. Eager attention materialises the scores: 1.29x the tree's peak on SDPA in
the same measurement (2 layers of 8 heads; the scores kept for the backward grow with layers x
heads x L^2: 4 bytes x 16 heads x 2,255^2 = 0.3 GiB a layer at the 3B's 16 heads, 11 GiB over
its 36 layers). FlashAttention-2/3 (varlen)
cannot take an arbitrary 4D mask: :func:`resolve_layout` then falls back to ``naive`` with a
warning, so a run on such a kernel trains the same loss, only slower.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import warnings

import torch

from vlm_grpo_ma.algorithms import selective_log_softmax
from vlm_grpo_ma.models.loading import unwrap_model
from vlm_grpo_ma.rollout.types import TreeRollout

LAYOUTS = ("tree", "packed", "naive")


@dataclass
class TrainBatch:
    """Model inputs of a tree and its flat trained tokens (N = sum T_bk + sum A_bkm).

    Model inputs (R rows of length L; R = B tree, B*K packed, B*K*M naive):

    - ``input_ids`` [R, L] long, right-padded;
    - ``attention_mask``: [R, L] long (naive) or [R, 1, L, L] bool (tree, packed; True = may attend);
    - ``position_ids`` [3, R, L] long (mRoPE temporal, height, width);
    - ``mm_token_type_ids`` [R, L] long (0 over generated tokens and padding);
    - ``pixel_values`` [sum patches over rows, D] and ``image_grid_thw`` [images over rows, 3]
      (each row repeats its prompt's images), or None for text-only prompts.

    Trained tokens, canonical order (module docstring):

    - ``logit_rows``, ``logit_cols`` [N] long: the position whose logits predict the token;
    - ``targets`` [N] long: the token; ``is_thought`` [N] bool: segment label;
    - ``rollout_logp`` [N] float32: the sampler's log-probs (NaN where the sampler did not score
      the token, e.g. a ``</think>`` vLLM did not sample);
    - ``thought_lens`` [B, K], ``answer_lens`` [B, K, M]: the tree's segment lengths (what
      ``grpo_ma.token_terms`` expands the per-segment values with).
    """

    layout: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    logit_rows: torch.Tensor
    logit_cols: torch.Tensor
    targets: torch.Tensor
    is_thought: torch.Tensor
    rollout_logp: torch.Tensor
    thought_lens: torch.Tensor
    answer_lens: torch.Tensor

    def to(self, device: torch.device | str) -> "TrainBatch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if torch.is_tensor(v):
                kw[k] = v.to(device)
        return TrainBatch(**kw)

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def num_positions(self) -> int:
        """Forward positions computed (R * L, padding included)."""
        return int(self.input_ids.numel())


def prompt_mrope_positions(model: Any, rollout: TreeRollout, b: int) -> torch.Tensor:
    """Position ids [3, P_b] of prompt b (no padding) from the model's ``get_rope_index``."""
    core = unwrap_model(model).model
    ids = rollout.prompt_ids[b][None]
    pos, _ = core.get_rope_index(
        ids,
        mm_token_type_ids=rollout.prompt_mm_token_type_ids[b][None],
        image_grid_thw=rollout.image_grid_thw[b],
    )
    return pos[:, 0]


def tree_rollout_logp(rollout: TreeRollout) -> torch.Tensor:
    """[N] the rollout's sampling log-probs in canonical order."""
    parts = []
    for b in range(rollout.B):
        for k in range(rollout.K):
            parts.append(rollout.thought_logprobs[b][k])
            parts.extend(rollout.answer_logprobs[b][k])
    return torch.cat(parts).float() if parts else torch.zeros(0)


def _segment_rows(rollout: TreeRollout, layout: str):
    """Yield (b, segments) per training row: a list of (kind, k, m, ids) with kind in
    {'prompt', 'thought', 'answer'} (k, m: the thought and answer index; m of a naive row's
    thought is the row's answer, so that only the m = 0 copy is trained)."""
    for b in range(rollout.B):
        prompt = [("prompt", -1, -1, rollout.prompt_ids[b])]
        if layout == "tree":
            segs = list(prompt)
            for k in range(rollout.K):
                segs.append(("thought", k, -1, rollout.thought_ids[b][k]))
                segs.extend(("answer", k, m, rollout.answer_ids[b][k][m]) for m in range(rollout.M))
            yield b, segs
            continue
        for k in range(rollout.K):
            th = rollout.thought_ids[b][k]
            if layout == "packed":
                yield b, prompt + [("thought", k, -1, th)] + [
                    ("answer", k, m, rollout.answer_ids[b][k][m]) for m in range(rollout.M)
                ]
            else:
                for m in range(rollout.M):
                    yield b, prompt + [("thought", k, m, th), ("answer", k, m, rollout.answer_ids[b][k][m])]


@dataclass
class _Rows:
    """The [R, L] inputs of the training rows while they are filled (see :class:`TrainBatch`), and
    the segment labels the 4D mask is built from: ``branch`` -2 on padding, -1 on the prompt, k on
    thought k and its answers; ``answer`` m on the tokens of answer m, else -1."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    branch: torch.Tensor
    answer: torch.Tensor

    @classmethod
    def empty(cls, R: int, L: int, pad_id: int) -> "_Rows":
        return cls(torch.full((R, L), pad_id, dtype=torch.long), torch.zeros(3, R, L, dtype=torch.long),
                   torch.zeros(R, L, dtype=torch.long), torch.full((R, L), -2, dtype=torch.long),
                   torch.full((R, L), -1, dtype=torch.long))


def _fill_row(rows: _Rows, r: int, rollout: TreeRollout, b: int, segs: list, prompt_pos: torch.Tensor) -> dict:
    """Write row ``r`` (prompt ``b``'s ``segs``, from :func:`_segment_rows`) into ``rows``; return the
    trained tokens it holds, ``{(b, k, s): (r, logit columns [n], token ids [n])}`` with s = 0 for
    thought k and 1 + m for its answer m."""
    P = len(rollout.prompt_ids[b])
    text0 = int(prompt_pos.max()) + 1 if P else 0  # text position after the prompt
    col = 0
    thought_end: dict[int, int] = {}
    picks: dict = {}
    for kind, k, m, ids in segs:
        n = len(ids)
        span = slice(col, col + n)
        rows.input_ids[r, span] = ids
        if kind == "prompt":
            rows.position_ids[:, r, span] = prompt_pos
            rows.mm_token_type_ids[r, span] = rollout.prompt_mm_token_type_ids[b]
            rows.branch[r, span] = -1
        elif kind == "thought":
            # every thought continues from the prompt's end, as it was sampled
            rows.position_ids[:, r, span] = text0 + torch.arange(n)
            rows.branch[r, span] = k
            thought_end[k] = col + n - 1
            if m <= 0:  # naive: the thought is trained in row m = 0 only
                # the first thought token is predicted from the prompt's last position
                picks[(b, k, 0)] = (r, torch.cat([torch.tensor([P - 1]), torch.arange(col, col + n - 1)])[:n], ids)
        else:
            # every answer continues from its thought's end, as it was sampled
            rows.position_ids[:, r, span] = text0 + len(rollout.thought_ids[b][k]) + torch.arange(n)
            rows.branch[r, span] = k
            rows.answer[r, span] = m
            picks[(b, k, 1 + m)] = (r, torch.cat([torch.tensor([thought_end[k]]), torch.arange(col, col + n - 1)])[:n], ids)
        col += n
    return picks


def _trained_tokens(picks: dict, B: int, K: int, M: int) -> tuple[torch.Tensor, ...]:
    """``(logit_rows, logit_cols, targets, is_thought)`` [N] of the picked tokens, canonical order."""
    lrows, lcols, targets, is_thought = [], [], [], []
    for b in range(B):
        for k in range(K):
            for s in range(1 + M):
                r, cols, ids = picks[(b, k, s)]
                lrows.append(torch.full((len(ids),), r, dtype=torch.long))
                lcols.append(cols)
                targets.append(ids)
                is_thought.append(torch.full((len(ids),), s == 0))
    return torch.cat(lrows), torch.cat(lcols), torch.cat(targets).long(), torch.cat(is_thought)


def build_train_batch(model: Any, rollout: TreeRollout, *, layout: str = "tree", pad_id: int = 0) -> TrainBatch:
    """Lay out a tree rollout for the training forward.

    Args:
        model: the policy (``get_rope_index`` gives the prompt's mRoPE positions).
        rollout: the sampled tree (B prompts, K thoughts, M answers).
        layout: ``"tree"`` (one row per prompt, 4D mask), ``"packed"`` (one row per thought, 4D
            mask) or ``"naive"`` (K*M rows); a layout the attention kernel cannot run falls
            back to ``"naive"`` (:func:`resolve_layout`).
        pad_id: the padding token id (never trained, masked).
    Returns:
        a :class:`TrainBatch` on the CPU (``.to(device)`` it).
    """
    layout = resolve_layout(model, layout)
    prompt_pos = [prompt_mrope_positions(model, rollout, b) for b in range(rollout.B)]
    segments = list(_segment_rows(rollout, layout))
    rows = _Rows.empty(len(segments), max(sum(len(ids) for *_, ids in segs) for _, segs in segments), pad_id)
    picks: dict = {}
    pix, grids = [], []
    for r, (b, segs) in enumerate(segments):
        picks.update(_fill_row(rows, r, rollout, b, segs, prompt_pos[b]))
        if rollout.pixel_values[b] is not None:  # each row carries its prompt's images
            pix.append(rollout.pixel_values[b])
            grids.append(rollout.image_grid_thw[b])
    logit_rows, logit_cols, targets, is_thought = _trained_tokens(picks, rollout.B, rollout.K, rollout.M)
    return TrainBatch(
        layout=layout,
        input_ids=rows.input_ids,
        attention_mask=(rows.branch != -2).long() if layout == "naive" else tree_attention_mask(rows.branch, rows.answer),
        position_ids=rows.position_ids,
        mm_token_type_ids=rows.mm_token_type_ids,
        pixel_values=torch.cat(pix) if pix else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        logit_rows=logit_rows,
        logit_cols=logit_cols,
        targets=targets,
        is_thought=is_thought,
        rollout_logp=tree_rollout_logp(rollout),
        thought_lens=rollout.thought_lengths(),
        answer_lens=rollout.answer_lengths(),
    )


def tree_attention_mask(branch: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Boolean 4D mask [R, 1, L, L] (True = query i may attend key j) of tree or packed rows.

    ``branch`` [R, L]: -1 on the prompt, k on thought k and on its answers, -2 on padding;
    ``answer`` [R, L]: m on the tokens of answer m, -1 elsewhere. Query i attends key j iff
    ``j <= i`` and key j is in the prompt, or in the same branch and either in its thought or in
    the same answer as i: a thought sees the prompt and itself, an answer sees the prompt, its
    own thought and itself, never a sibling. A padding query attends only itself (a fully
    masked row would give NaN).
    """
    L = branch.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=branch.device).tril()
    qb, kb = branch[:, :, None], branch[:, None, :]
    qa, ka = answer[:, :, None], answer[:, None, :]
    visible = (kb == -1) | ((kb == qb) & ((ka == -1) | (ka == qa)))
    allowed = causal & visible & (kb != -2) & (qb != -2)
    pad_q = (branch == -2)[:, :, None] & torch.eye(L, dtype=torch.bool, device=branch.device)
    return (allowed | pad_q)[:, None]


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """Boolean 4D mask [R, 1, L, L] of packed rows (one thought per row).

    ``segment`` [R, L]: -1 on the shared prefix (prompt + thought), m on the tokens of answer m,
    -2 on padding. Query i attends key j iff ``j <= i`` and key j is in the prefix or in the
    same answer as i (:func:`tree_attention_mask` with one branch).
    """
    branch = torch.where(segment == -2, -2, torch.where(segment == -1, -1, 0))
    answer = torch.where(segment >= 0, segment, -1)
    return tree_attention_mask(branch, answer)


#: attention implementations that take an arbitrary boolean / additive 4D mask
MASK_ATTENTION = ("sdpa", "eager")
_warned: set[str] = set()


def attention_implementation(model: Any) -> str:
    return getattr(unwrap_model(model).config, "_attn_implementation", "sdpa") or "sdpa"


def resolve_layout(model: Any, layout: str) -> str:
    """``layout``, or ``"naive"`` where the model's attention kernel cannot take the 4D mask of
    ``tree`` / ``packed`` (FlashAttention-2/3 varlen, ...), with a one-time warning."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    impl = attention_implementation(model)
    if layout == "naive" or impl in MASK_ATTENTION:
        return layout
    if impl not in _warned:
        _warned.add(impl)
        warnings.warn(
            f"train_layout {layout!r} needs an arbitrary 4D attention mask, which attn_implementation={impl!r} "
            "cannot take: training with the naive layout instead (same loss, K*M rows); use "
            "attn_implementation='sdpa' for the faster layout",
            stacklevel=2,
        )
    return "naive"


def _mask_for_attention(model: Any, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dim() != 4:
        return mask
    impl = attention_implementation(model)
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise NotImplementedError(
        f"the tree and packed layouts need an arbitrary 4D attention mask, which attn_implementation={impl!r} "
        "cannot take; use layout='naive' (or attn_implementation='sdpa' / 'eager')"
    )


def score_tokens(model: Any, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [N] (float32, with gradient) of the batch's trained tokens, canonical order.

    One forward of the backbone over the layout's rows, the LM head only at the N positions that
    predict a trained token, then ``selective_log_softmax``. ``temperature`` divides the logits
    (use the sampling temperature, so that the scores match the rollout's log-probs).
    """
    m = unwrap_model(model)
    dev = next(m.parameters()).device
    batch = batch.to(dev)
    dtype = next(m.parameters()).dtype
    kw: dict[str, Any] = dict(
        input_ids=batch.input_ids,
        attention_mask=_mask_for_attention(m, batch.attention_mask, dtype),
        position_ids=batch.position_ids,
        mm_token_type_ids=batch.mm_token_type_ids,
        use_cache=False,
    )
    if batch.pixel_values is not None:
        kw["pixel_values"] = batch.pixel_values
        kw["image_grid_thw"] = batch.image_grid_thw
    hidden = m.model(**kw).last_hidden_state  # [R, L, H]
    h = hidden[batch.logit_rows, batch.logit_cols]  # [N, H]
    logits = m.lm_head(h)  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, batch.targets)
