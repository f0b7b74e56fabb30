"""The transformers rollout backend: tree sampling with shared prefixes (prefill once).

Stage 1 prefills each prompt once (images included), repeats its KV cache K times and samples
K thoughts until ``</think>`` (a thought that reaches the limit is closed with ``</think>``).
The closing token is fed too, so when stage 1 ends the cache holds prompt + thought for every
(prompt, thought) row.  Stage 2 repeats that cache M times and samples M answers per thought
until the end token.  Nothing is ever prefilled twice: the prompt and the thought are each
computed once, whatever K and M (the way nanochat's engine prefills once and clones its cache).
``generate_tree_pilot`` (dynamic sampling's GRPO-MA pilot) keeps that property: one answer per
thought first, then the other answers of the kept prompts from a copy of the thoughts' cache.
``generate_answers`` is the one exception: it continues thoughts handed in from outside, so it
prefills prompt + thought again.

The decode loop is written here rather than delegated to ``model.generate`` so that every
position is explicit (no ``generate`` state such as a cached ``rope_deltas`` is relied on):

- mRoPE positions: the prompt's come from the model's ``get_rope_index`` (3 rows: temporal,
  height, width); a generated token gets the text position ``max(prompt positions) + 1 + i`` on
  all three rows.  The model's ``rope_deltas`` state is never read, and is reset to None after
  a rollout so that no later forward can pick up a stale value;
- ``pixel_values`` are passed to the prefill only (never with a non-empty cache);
- rows that finished early are fed a padding token with attention-mask 0, so the cache stays
  rectangular and the padding is invisible to every later token;
- vision special tokens are suppressed when sampling (a random model samples them and one
  ``<|image_pad|>`` breaks the next forward).

Under DeepSpeed ZeRO-3 pass ``gather_context`` (a zero-argument callable returning a context
manager, e.g. ``lambda: deepspeed.zero.GatheredParameters(model.parameters())``) and/or
``synced_gpus=True`` (every rank keeps stepping until all ranks are done, so ranks that stop
at different lengths never deadlock).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

from vlm_grpo_ma.format import split_completion
from vlm_grpo_ma.models.chat_templates import generation_prefix
from vlm_grpo_ma.models.loading import unwrap_model
from vlm_grpo_ma.rollout.types import SamplingParams, TreeRollout

# transformers 5.24 renamed the key/value cache argument and output field `past_key_values` to
# `cache` (the old name warns on every forward and is removed in 5.40); earlier 5.x releases know
# only the old name.
_CACHE_ARG = "cache" if Version(transformers.__version__).release[:2] >= (5, 24) else "past_key_values"


@dataclass(frozen=True)
class RolloutTokenIds:
    """The token ids the sampler needs.

    ``think_end``: the id of ``</think>`` where the vocabulary has it as one token (the project's
    tiny tokenizers, Qwen3-VL), else None: Qwen2-VL and Qwen2.5-VL checkpoints spell ``</think>``
    with several ordinary tokens, and a thought then ends when its decoded text contains
    ``think_end_text``; ``think_end_ids``: the tokens appended to close a truncated thought
    (``(think_end,)`` or the tokenization of ``</think>``); ``stop``: ids that end an answer
    (``<|im_end|>``, and ``<|endoftext|>`` where the vocabulary has it); ``pad``: fed to finished
    rows (masked out); ``suppress``: never sampled (vision special tokens)."""

    think_end: int | None
    stop: tuple[int, ...]
    pad: int
    suppress: tuple[int, ...] = ()
    think_end_ids: tuple[int, ...] = ()
    think_end_text: str = "</think>"

    def __post_init__(self) -> None:
        if not self.think_end_ids:
            if self.think_end is None:
                raise ValueError("RolloutTokenIds needs think_end or think_end_ids")
            object.__setattr__(self, "think_end_ids", (int(self.think_end),))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "RolloutTokenIds":
        def tid(tok: str) -> int | None:
            i = tokenizer.convert_tokens_to_ids(tok)
            return None if i is None or i == tokenizer.unk_token_id else int(i)

        think_end = tid("</think>")
        close = (think_end,) if think_end is not None else tuple(tokenizer.encode("</think>", add_special_tokens=False))
        stop = tuple(i for i in (tid("<|im_end|>"), tid("<|endoftext|>")) if i is not None)
        if not stop:
            stop = (int(tokenizer.eos_token_id),)
        pad = tokenizer.pad_token_id
        pad = int(pad) if pad is not None else stop[-1]
        from vlm_grpo_ma.models import vision_token_ids

        suppress = tuple(vision_token_ids(tokenizer))
        return cls(think_end=think_end, stop=stop, pad=pad, suppress=suppress, think_end_ids=close)


# --------------------------------------------------------------------------- sampling
def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from unnormalised non-negative weights, by inverse CDF.

    Args:
        probs: [N, V] float weights, each row with a positive sum (zeros are never drawn).
    Returns:
        [N] long indices, index v drawn with probability ``probs[n, v] / probs[n].sum()``.

    Same distribution as ``torch.multinomial(probs, 1)``, but one cumsum and one binary search
    per row: on CPU ``multinomial`` cost 3.4 ms for [64, 1152] and this 0.13 ms (1 thread), which
    is most of a tiny model's per-token sampling cost.  ``u`` in [0, total) is looked up with
    ``right=True`` (the first index whose cumulative weight exceeds ``u``: a zero-weight index
    never qualifies), and a ``u`` that rounds up to the total (rare: only then can the index land
    past the row's last positive weight) falls back to that last positive-weight index.
    """
    cdf = probs.float().cumsum(-1)  # [N, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    V = probs.shape[-1]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=V - 1)  # [N]
    past_end = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0  # [N], almost always all False
    if bool(past_end.any()):
        last_positive = V - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)  # [N]
        idx = torch.where(past_end, last_positive, idx)
    return idx


def sample_next(
    logits: torch.Tensor,
    sampling: SamplingParams,
    suppress: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Args:
        logits: [N, V] next-token logits (any float dtype).
        suppress: LongTensor [S] of ids never drawn.
    Returns:
        tokens [N] long, logp [N] float32: log-prob of the drawn token under
        ``log_softmax(logits / T)`` (T = temperature, or 1 when greedy) before filtering,
        and logp_all [N, V] float32 (that full log-distribution, to score forced tokens).
    """
    logits = logits.float()
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    filtered = logp_all.clone()
    if suppress is not None and suppress.numel():
        filtered[:, suppress] = -math.inf
    if sampling.greedy:
        tokens = filtered.argmax(dim=-1)
    else:
        if sampling.top_k > 0 and sampling.top_k < filtered.shape[-1]:
            kth = torch.topk(filtered, sampling.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, -math.inf)
        if sampling.top_p < 1.0:
            sorted_lp, order = torch.sort(filtered, dim=-1, descending=True)
            probs = torch.softmax(sorted_lp, dim=-1)
            # drop a token when the mass strictly before it already reaches top_p (keeps >= 1)
            drop = (probs.cumsum(-1) - probs) >= sampling.top_p
            sorted_lp = sorted_lp.masked_fill(drop, -math.inf)
            filtered = torch.full_like(filtered, -math.inf).scatter(-1, order, sorted_lp)
        probs = torch.softmax(filtered, dim=-1)
        tokens = sample_categorical(probs, generator)
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logp, logp_all


def prompt_position_ids(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """mRoPE position ids [3, B, P] of a left-padded prompt batch (padding positions 0), from
    the model's own ``get_rope_index`` (all three families)."""
    core = unwrap_model(model).model
    input_ids = inputs["input_ids"]
    mm = inputs.get("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(input_ids)
    pos, _ = core.get_rope_index(
        input_ids,
        mm_token_type_ids=mm,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs.get("attention_mask"),
    )
    return pos


def split_vision(inputs: Mapping[str, Any]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Per-prompt chunks of the processor's flat ``pixel_values`` [sum patches, D] and
    ``image_grid_thw`` [n_images, 3]: prompt b gets as many images as it has runs of image
    tokens in ``mm_token_type_ids``, each image ``prod(grid_thw)`` patch rows."""
    mm = inputs.get("mm_token_type_ids")
    grid = inputs.get("image_grid_thw")
    pix = inputs.get("pixel_values")
    B = inputs["input_ids"].shape[0]
    if grid is None or pix is None or mm is None:
        return [None] * B, [None] * B
    is_img = (mm == 1).long()
    starts = (is_img[:, 1:] > is_img[:, :-1]).sum(1) + is_img[:, 0]
    n_imgs = starts.tolist()
    if sum(n_imgs) != grid.shape[0]:
        raise ValueError(f"prompts hold {sum(n_imgs)} image token runs but image_grid_thw has {grid.shape[0]} rows")
    patches = grid.prod(-1).tolist()
    out_pix: list[torch.Tensor | None] = []
    out_grid: list[torch.Tensor | None] = []
    i = row = 0
    for n in n_imgs:
        if n == 0:
            out_pix.append(None)
            out_grid.append(None)
            continue
        p = sum(patches[i : i + n])
        out_pix.append(pix[row : row + p])
        out_grid.append(grid[i : i + n])
        i += n
        row += p
    return out_pix, out_grid


def _any_rank(flag: bool, synced: bool, device: torch.device) -> bool:
    if not synced:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


@dataclass
class _DecodeState:
    """A batch of N rows mid-generation: the cache, the 2D attention mask [N, L], the next
    text position [N] and the next-token logits [N, V]."""

    cache: Any
    attention_mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor

    def repeat_interleave(self, n: int) -> "_DecodeState":
        if n > 1:
            self.cache.batch_repeat_interleave(n)  # in place: the un-repeated cache is not reused
            self.attention_mask = self.attention_mask.repeat_interleave(n, 0)
            self.next_pos = self.next_pos.repeat_interleave(n, 0)
            self.logits = self.logits.repeat_interleave(n, 0)
        return self


def _begin_generation(model: Any) -> tuple[Any, bool]:
    """Before a rollout: the unwrapped model in eval mode, and whether it was training (for
    :func:`_end_generation`, called in a ``finally``; a generator-based context manager here kept
    the model reachable through DeepSpeed's forward-module stack)."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    return model, was_training


def _end_generation(model: Any, was_training: bool) -> None:
    """After a rollout: the model's mode back, and the ``rope_deltas`` the Qwen-VL model keeps
    from its last forward cleared (a training forward must not reuse a rollout's mRoPE offsets)."""
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    model.train(was_training)


class Decoded(NamedTuple):
    """One decode stage's output over R rows (right-padded): ``tokens`` [R, T] long, ``logp``
    [R, T] float32, ``lengths`` [R], ``truncated`` [R] bool, and ``decoded``: the forward
    positions computed (padding of finished rows included)."""

    tokens: torch.Tensor
    logp: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    decoded: int


class HFRolloutBackend:
    """Tree rollouts (and plain completions) with a transformers Qwen-VL model.

    Args:
        model: a ``Qwen2VL``/``Qwen2_5_VL``/``Qwen3VL`` ``ForConditionalGeneration`` (or a PEFT /
            DeepSpeed wrapper of one).
        tokenizer: decodes texts and provides the special ids (or pass ``token_ids``).
        processor: needed only by :meth:`generate` / :meth:`generate_tree_from_messages`.
        gather_context: zero-argument callable returning a context manager entered around each
            rollout (ZeRO-3: ``lambda: deepspeed.zero.GatheredParameters(params)``).
        synced_gpus: keep all ranks stepping until every rank is done (ZeRO-3 without gathering).
        completion_prefix: what the chat template's generation prompt already wrote of every
            completion (``"<think>\\n"`` for Qwen3-VL Thinking); put in front of every thought
            text and every completion text, so the format rule reads whole completions.
            ``None`` (default): read from the processor's (else the tokenizer's) chat template
            (:func:`vlm_grpo_ma.models.chat_templates.generation_prefix`; an unknown template
            raises here); ``""`` where neither has a chat template.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        processor: Any = None,
        *,
        token_ids: RolloutTokenIds | None = None,
        gather_context: Callable[[], ContextManager] | None = None,
        synced_gpus: bool = False,
        completion_prefix: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if token_ids is None:
            if self.tokenizer is None:
                raise ValueError("HFRolloutBackend needs a tokenizer, a processor or token_ids")
            token_ids = RolloutTokenIds.from_tokenizer(self.tokenizer)
        self.ids = token_ids
        self.gather_context = gather_context
        self.synced_gpus = synced_gpus
        if completion_prefix is None:
            owner = next((o for o in (processor, self.tokenizer) if getattr(o, "chat_template", None)), None)
            completion_prefix = generation_prefix(owner) if owner is not None else ""
        self.completion_prefix = completion_prefix

    # ------------------------------------------------------------------ internals
    @property
    def _device(self) -> torch.device:
        return next(unwrap_model(self.model).parameters()).device

    def _context(self) -> ContextManager:
        return self.gather_context() if self.gather_context is not None else contextlib.nullcontext()

    def _prefill(self, inputs: Mapping[str, Any]) -> tuple[_DecodeState, int]:
        """Forward the left-padded prompts once, with their images. Returns the decode state
        and the number of prompt tokens prefilled (padding excluded)."""
        dev = self._device
        inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items() if v is not None}
        input_ids = inputs["input_ids"]
        attn = inputs.get("attention_mask", torch.ones_like(input_ids)).long()
        inputs["attention_mask"] = attn
        mm = inputs.get("mm_token_type_ids", torch.zeros_like(input_ids))
        pos = prompt_position_ids(self.model, {**inputs, "mm_token_type_ids": mm})
        kw = dict(input_ids=input_ids, attention_mask=attn, position_ids=pos, mm_token_type_ids=mm)
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if k in inputs:
                kw[k] = inputs[k]
        out = self.model(use_cache=True, return_dict=True, logits_to_keep=1, **kw)
        next_pos = pos.amax(dim=(0, 2)) + 1  # [B]
        state = _DecodeState(out[_CACHE_ARG], attn, next_pos, out.logits[:, -1].float())
        return state, int(attn.sum())

    def _decode(
        self,
        state: _DecodeState,
        sampling: SamplingParams,
        max_new: int,
        stop: torch.Tensor | None,
        generator: torch.Generator | None,
        close_ids: tuple[int, ...] = (),
        stop_text: str | None = None,
    ) -> Decoded:
        """Sample up to ``max_new`` tokens for every row of ``state`` (mutated in place).

        A row stops after a token in ``stop`` or, with ``stop_text``, once its decoded text
        contains ``stop_text``.  With ``close_ids`` (stage 1) a row still open when
        ``len(close_ids)`` steps are left is closed with ``close_ids`` instead of samples
        (log-probs: the policy's; a single closing token that was sampled anyway does not count
        as truncation), and every row's last token is fed, so ``state`` ends holding each row's
        whole sequence and ``state.logits`` the next-token logits after its last token.
        Returns tokens [N, T] (pad after the end), logp [N, T], lengths [N], truncated [N]
        (stopped by the limit), and the number of forward positions computed.
        """
        N = state.logits.shape[0]
        dev = state.logits.device
        feed_last = bool(close_ids)
        n_close = len(close_ids)
        if n_close > max_new:
            raise ValueError(f"the thought limit ({max_new} tokens) is shorter than its closing sequence {close_ids}")
        force_start = max_new - n_close
        suppress = torch.tensor(self.ids.suppress, dtype=torch.long, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        forcing = torch.zeros(N, dtype=torch.bool, device=dev)
        truncated = torch.zeros(N, dtype=torch.bool, device=dev)
        lengths = torch.zeros(N, dtype=torch.long, device=dev)
        final_logits = state.logits.clone()
        toks, lps = [], []
        decoded = 0
        for t in range(max_new):
            if not _any_rank(not bool(done.all()), self.synced_gpus, dev):
                break
            tok, lp, lp_all = sample_next(state.logits, sampling, suppress, generator)
            active = ~done
            last_step = t == max_new - 1
            if n_close and t >= force_start:
                forced = close_ids[t - force_start]
                if t == force_start:
                    forcing = active & (tok != forced) if n_close == 1 else active.clone()
                tok = torch.where(forcing, torch.full_like(tok, forced), tok)
                lp = torch.where(forcing, lp_all[:, forced], lp)
            tok = torch.where(active, tok, torch.full_like(tok, self.ids.pad))
            lp = torch.where(active, lp, torch.zeros_like(lp))
            toks.append(tok)
            lps.append(lp)
            lengths += active.long()
            if stop_text is not None:
                stopped = active & ~forcing & self._text_stopped(toks, active, stop_text, n_close)
            else:
                stopped = active & ~forcing & torch.isin(tok, stop)
            if last_step:
                truncated = forcing if n_close else active & ~stopped
            done_after = done | stopped | (active if last_step else torch.zeros_like(done))
            if feed_last or _any_rank(not bool(done_after.all()), self.synced_gpus, dev):
                state.attention_mask = torch.cat([state.attention_mask, active.long()[:, None]], dim=1)
                pos = state.next_pos.view(1, N, 1).expand(3, N, 1)
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=state.attention_mask,
                    position_ids=pos,
                    use_cache=True,
                    return_dict=True,
                    **{_CACHE_ARG: state.cache},
                )
                state.cache = out[_CACHE_ARG]
                state.next_pos = state.next_pos + active.long()
                state.logits = out.logits[:, -1].float()
                final_logits = torch.where(active[:, None], state.logits, final_logits)
                decoded += N
            done = done_after
        if feed_last:
            state.logits = final_logits
        T = len(toks)
        tokens = torch.stack(toks, 1) if T else torch.empty(N, 0, dtype=torch.long, device=dev)
        logp = torch.stack(lps, 1) if T else torch.empty(N, 0, device=dev)
        return Decoded(tokens, logp, lengths, truncated, decoded)

    def _text_stopped(self, toks: list[torch.Tensor], active: torch.Tensor, stop_text: str, n_close: int) -> torch.Tensor:
        """[N] bool: rows whose last few generated tokens decode to text containing
        ``stop_text`` (for a closing tag the vocabulary spells with several tokens)."""
        if self.tokenizer is None:
            raise ValueError("a text stop needs the tokenizer")
        tail = torch.stack(toks[-(n_close + 2):], dim=1).cpu()
        hit = torch.zeros(len(active), dtype=torch.bool)
        for r in active.nonzero().flatten().tolist():
            hit[r] = stop_text in self.tokenizer.decode(tail[r].tolist(), skip_special_tokens=False)
        return hit.to(active.device)

    def _decode_thoughts(self, state: "_DecodeState", sampling: SamplingParams, gen) -> "Decoded":
        """Stage 1 on ``state`` (its rows already repeated K times): until ``</think>`` (the token,
        or the text where the vocabulary spells it with several tokens)."""
        text_stop = self.ids.think_end is None
        return self._decode(
            state, sampling, sampling.max_thought_tokens,
            None if text_stop else torch.tensor([self.ids.think_end], device=state.logits.device), gen,
            close_ids=self.ids.think_end_ids, stop_text=self.ids.think_end_text if text_stop else None,
        )

    def _decode_text(self, ids: torch.Tensor, drop_stop: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        ids = ids.tolist()
        if drop_stop and ids and ids[-1] in self.ids.stop:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self._device)
        g.manual_seed(seed)
        return g

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate_tree(
        self, prompts_inputs: Mapping[str, Any], K: int, M: int, sampling: SamplingParams
    ) -> TreeRollout:
        """Sample K thoughts per prompt and M answers per thought (see the module docstring).

        ``prompts_inputs``: left-padded processor outputs of B prompts (``input_ids`` [B, P],
        ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
        """
        if K < 1 or M < 1:
            raise ValueError(f"K and M must be >= 1, got K={K}, M={M}")
        model, was_training = _begin_generation(self.model)
        gen = self._generator(sampling.seed)
        try:
            with self._context():
                state, n_prefill = self._prefill(prompts_inputs)
                B = state.logits.shape[0]
                state.repeat_interleave(K)  # stage 1: K thoughts per prompt from one prefill
                thoughts = self._decode_thoughts(state, sampling, gen)
                state.repeat_interleave(M)  # stage 2: M answers per thought, continuing the cached prompt + thought
                answers = self._decode(state, sampling, sampling.max_answer_tokens,
                                       torch.tensor(self.ids.stop, device=state.logits.device), gen)
        finally:
            _end_generation(model, was_training)
        return self._assemble(prompts_inputs, B, K, M, thoughts, answers, n_prefill)

    def _assemble(self, inputs: Mapping[str, Any], B: int, K: int, M: int, thoughts: Decoded, answers: Decoded,
                  n_prefill: int) -> TreeRollout:
        """The TreeRollout of B prompts from the two stages' outputs (thought rows ``b * K + k``,
        answer rows ``(b * K + k) * M + m``)."""
        t_tok, t_lp, t_len, t_trunc, _ = thoughts
        a_tok, a_lp, a_len, a_trunc, _ = answers
        n_decoded = thoughts.decoded + answers.decoded
        attn = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        mm = inputs.get("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
        prompt_ids = [inputs["input_ids"][b][attn[b]] for b in range(B)]
        prompt_mm = [mm[b][attn[b].to(mm.device)] for b in range(B)]
        pix, grid = split_vision(inputs)
        t_tok, t_lp, t_len = t_tok.cpu(), t_lp.cpu(), t_len.cpu()
        a_tok, a_lp, a_len = a_tok.cpu(), a_lp.cpu(), a_len.cpu()
        th_ids, th_lp, th_txt, an_ids, an_lp, an_txt = [], [], [], [], [], []
        for b in range(B):
            th_ids.append([]); th_lp.append([]); th_txt.append([])
            an_ids.append([]); an_lp.append([]); an_txt.append([])
            for k in range(K):
                r = b * K + k
                ids = t_tok[r, : t_len[r]]
                th_ids[b].append(ids)
                th_lp[b].append(t_lp[r, : t_len[r]])
                # the text is cut right after </think>; what the stopping token carried past
                # it (e.g. the "<" of "><") starts every answer (vlm_grpo_ma.format)
                thought, carried = split_completion(self._decode_text(ids))
                th_txt[b].append(self.completion_prefix + thought)
                an_ids[b].append([]); an_lp[b].append([]); an_txt[b].append([])
                for m in range(M):
                    q = r * M + m
                    aid = a_tok[q, : a_len[q]]
                    an_ids[b][k].append(aid)
                    an_lp[b][k].append(a_lp[q, : a_len[q]])
                    an_txt[b][k].append(carried + self._decode_text(aid, drop_stop=True))
        return TreeRollout(
            prompt_ids=[p.cpu() for p in prompt_ids],
            prompt_mm_token_type_ids=[p.cpu() for p in prompt_mm],
            pixel_values=pix,
            image_grid_thw=grid,
            thought_ids=th_ids,
            thought_logprobs=th_lp,
            thought_truncated=t_trunc.cpu().view(B, K),
            answer_ids=an_ids,
            answer_logprobs=an_lp,
            answer_truncated=a_trunc.cpu().view(B, K, M),
            thought_texts=th_txt,
            answer_texts=an_txt,
            stats={
                "tokens_prefilled": float(n_prefill),
                "tokens_decoded": float(n_decoded),
                "tokens_generated": float(t_len.sum() + a_len.sum()),
            },
        )

    @torch.no_grad()
    def generate_answers(self, rollout: TreeRollout, M: int, sampling: SamplingParams) -> TreeRollout:
        """M NEW answers for each thought of an existing tree (the GRPO-MA pilot of dynamic sampling
        samples one answer per thought first, then the rest for the prompts it keeps).

        Each (prompt, thought) row is prefilled again (its images included; the thought tokens
        get the text positions they were sampled with, from ``get_rope_index`` over prompt +
        thought), then stage 2 runs as in :meth:`generate_tree`. Returns a TreeRollout with the
        same prompts and thoughts and only the M new answers (append them with
        ``rollout.types.append_answers``); ``stats`` count this call's work.
        """
        if M < 1:
            raise ValueError(f"M must be >= 1, got {M}")
        B, K = rollout.B, rollout.K
        rows = [(b, k) for b in range(B) for k in range(K)]
        seqs = [torch.cat([rollout.prompt_ids[b], rollout.thought_ids[b][k]]) for b, k in rows]
        mms = [torch.cat([rollout.prompt_mm_token_type_ids[b], torch.zeros(len(rollout.thought_ids[b][k]),
                                                                          dtype=torch.long)]) for b, k in rows]
        L = max(len(x) for x in seqs)
        ids = torch.full((len(rows), L), self.ids.pad, dtype=torch.long)
        mm = torch.zeros(len(rows), L, dtype=torch.long)
        attn = torch.zeros(len(rows), L, dtype=torch.long)
        for r, (x, t) in enumerate(zip(seqs, mms)):  # left padding, as the processor's
            ids[r, L - len(x):] = x
            mm[r, L - len(x):] = t
            attn[r, L - len(x):] = 1
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm}
        pix = [rollout.pixel_values[b] for b, _ in rows if rollout.pixel_values[b] is not None]
        if pix:
            inputs["pixel_values"] = torch.cat(pix)
            inputs["image_grid_thw"] = torch.cat([rollout.image_grid_thw[b] for b, _ in rows
                                                  if rollout.image_grid_thw[b] is not None])
        model, was_training = _begin_generation(self.model)
        gen = self._generator(sampling.seed)
        try:
            with self._context():
                state, n_prefill = self._prefill(inputs)
                state.repeat_interleave(M)
                answers = self._decode(state, sampling, sampling.max_answer_tokens,
                                       torch.tensor(self.ids.stop, device=state.logits.device), gen)
        finally:
            _end_generation(model, was_training)
        return self._new_answers(rollout, M, answers, {"tokens_prefilled": float(n_prefill)})

    def _new_answers(self, rollout: TreeRollout, M: int, answers: Decoded, stats: dict) -> TreeRollout:
        """``rollout`` (its prompts and thoughts) with only the M answers per thought decoded here
        (rows ``(b * K + k) * M + m``)."""
        B, K = rollout.B, rollout.K
        a_tok, a_lp, a_len, a_trunc, _ = answers
        stats = {**stats, "tokens_decoded": float(answers.decoded)}
        a_tok, a_lp, a_len = a_tok.cpu(), a_lp.cpu(), a_len.cpu()
        an_ids, an_lp, an_txt = [], [], []
        for b in range(B):
            an_ids.append([]); an_lp.append([]); an_txt.append([])  # noqa: E702
            for k in range(K):
                _, carried = split_completion(self._decode_text(rollout.thought_ids[b][k]))
                q0 = (b * K + k) * M
                an_ids[b].append([a_tok[q, : a_len[q]] for q in range(q0, q0 + M)])
                an_lp[b].append([a_lp[q, : a_len[q]] for q in range(q0, q0 + M)])
                an_txt[b].append([carried + self._decode_text(a_tok[q, : a_len[q]], drop_stop=True)
                                  for q in range(q0, q0 + M)])
        return replace(
            rollout, answer_ids=an_ids, answer_logprobs=an_lp, answer_truncated=a_trunc.cpu().view(B, K, M),
            answer_texts=an_txt, stats={**stats, "tokens_generated": float(a_len.sum())},
        )

    @torch.no_grad()
    def generate_tree_pilot(
        self, prompts_inputs: Mapping[str, Any], K: int, M: int, sampling: SamplingParams,
        decide: Callable[[TreeRollout], Sequence[int]],
    ) -> tuple[TreeRollout, TreeRollout | None]:
        """The GRPO-MA pilot of dynamic sampling in one pass: K thoughts per prompt and ONE answer
        each (the pilot tree, M = 1), then ``decide(pilot tree)`` returns the prompts to complete,
        and only those get their other M - 1 answers per thought, continuing the cache the thoughts
        left (copied before the pilot answers; rows selected, nothing prefilled again).

        Returns ``(pilot tree, tree of the kept prompts with their M - 1 new answers, or None)``;
        ``decide`` runs inside the generation context (it may score, and call collectives that
        every rank reaches). The pilot tree's stats count stage 1 and the pilot answers.
        """
        import copy

        if K < 1 or M < 2:
            raise ValueError(f"the pilot needs K >= 1 and M >= 2, got K={K}, M={M}")
        model, was_training = _begin_generation(self.model)
        gen = self._generator(sampling.seed)
        rest = None
        try:
            with self._context():
                state, n_prefill = self._prefill(prompts_inputs)
                dev = state.logits.device
                B = state.logits.shape[0]
                state.repeat_interleave(K)
                thoughts = self._decode_thoughts(state, sampling, gen)
                saved = _DecodeState(copy.deepcopy(state.cache), state.attention_mask.clone(), state.next_pos.clone(),
                                     state.logits.clone())
                stop = torch.tensor(self.ids.stop, device=dev)
                first = self._decode(state, sampling, sampling.max_answer_tokens, stop, gen)
                del state
                pilot = self._assemble(prompts_inputs, B, K, 1, thoughts, first, n_prefill)
                kept = list(decide(pilot))
                if kept:
                    rows = torch.tensor([b * K + k for b in kept for k in range(K)], device=dev)
                    saved.cache.batch_select_indices(rows)
                    saved.attention_mask = saved.attention_mask[rows]
                    saved.next_pos = saved.next_pos[rows]
                    saved.logits = saved.logits[rows]
                    saved.repeat_interleave(M - 1)
                    more = self._decode(saved, sampling, sampling.max_answer_tokens, stop, gen)
                    rest = self._new_answers(pilot.select(kept, keep_stats=False), M - 1, more, {"tokens_prefilled": 0.0})
                del saved
        finally:
            _end_generation(model, was_training)
        return pilot, rest

    def generate_tree_from_messages(
        self, messages_batch: Sequence[list[dict]], K: int, M: int, sampling: SamplingParams
    ) -> TreeRollout:
        """:meth:`generate_tree` on chat messages (collated with the backend's processor)."""
        from vlm_grpo_ma.data.collate import build_generation_inputs

        return self.generate_tree(build_generation_inputs(self.processor, messages_batch), K, M, sampling)

    @torch.no_grad()
    def generate_ids(
        self, prompts_inputs: Mapping[str, Any], n: int = 1, sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Single-stage completions: n per prompt until the end token.  Greedy by default.
        Returns tokens [B*n, T] (row ``b * n + j``), logp [B*n, T], lengths [B*n]."""
        sampling = sampling or SamplingParams(temperature=0.0)
        max_new = max_new_tokens or (sampling.max_thought_tokens + sampling.max_answer_tokens)
        model, was_training = _begin_generation(self.model)
        try:
            with self._context():
                state, _ = self._prefill(prompts_inputs)
                state.repeat_interleave(n)
                stop = torch.tensor(self.ids.stop, device=state.logits.device)
                tok, lp, length, _, _ = self._decode(state, sampling, max_new, stop, self._generator(sampling.seed))
        finally:
            _end_generation(model, was_training)
        return tok.cpu(), lp.cpu(), length.cpu()

    def generate(
        self, messages_batch: Sequence[list[dict]], n: int = 1, sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> list[list[str]]:
        """Completion texts [B][n] for chat messages (greedy by default), end token dropped."""
        from vlm_grpo_ma.data.collate import build_generation_inputs

        inputs = build_generation_inputs(self.processor, messages_batch)
        tok, _, length = self.generate_ids(inputs, n, sampling, max_new_tokens)
        B = inputs["input_ids"].shape[0]
        return [[self.completion_prefix + self._decode_text(tok[b * n + j, : length[b * n + j]], drop_stop=True)
                 for j in range(n)] for b in range(B)]
