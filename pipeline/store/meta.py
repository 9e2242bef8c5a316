"""The store's metadata: one typed record in the root group's attributes, written and read only here.

``StoreIdentity`` is what decides the stored values: the format version, the model's weights, the
task, the extraction settings asked for, and per split where its examples came from and a hash of
them. Its hash is the store's fingerprint, the one definition of "the same store": a resume, a
finished-store check and training all compare identities, never a list of settings of their own.
It is computable before the model is loaded (everything else in ``StoreMeta`` follows from it).
Nothing volatile (times, paths of the store) is recorded, so the same inputs give the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.common.errors import StoreFormatError
from pipeline.store.format import ATTRS_KEY, FORMAT_VERSION, fingerprint


@dataclass(frozen=True)
class ExtractionSettings:
    """The extraction settings asked for that decide the stored values."""

    max_length: int
    dtype: str  # storage dtype: bfloat16 (uint16 bits), float16 or float32
    tokens: str  # all: every token; pooled: per layer the mean over tokens
    layers: tuple[int, ...] | None  # as asked; None: every state (the resolved ones: StoreLayout)
    limit: int | None
    block_tokens: int | None
    codec: str


@dataclass(frozen=True)
class SplitData:
    """Which examples a split was built from: their source and a hash of them, in order."""

    source: str  # "local:<file>" or "hub:<dataset>"
    sha256: str  # pipeline.store.format.examples_hash of texts, labels and ids
    num_examples: int


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that decides a store's content; its hash is the fingerprint."""

    format_version: int
    model: str  # the weights: a content hash or Hub commit, else the model's name
    task: str
    settings: ExtractionSettings
    data: dict[str, SplitData] = field(default_factory=dict)  # the splits the store holds
    # How the examples become model inputs (TaskInfo.template): "" in a store made before it was part of the
    # identity, when pair encoders did not get their segment ids yet.
    template: str = ""

    @property
    def fingerprint(self) -> str:
        plain = dataclasses.asdict(self)
        if not self.template:
            del plain["template"]  # hashed as it was when recorded
        return fingerprint(plain)

    def only(self, splits: set[str] | list[str]) -> StoreIdentity:
        return dataclasses.replace(self, data={k: v for k, v in self.data.items() if k in splits})

    def mismatch(self, other: StoreIdentity) -> str | None:
        """What differs from ``other`` on the splits both hold (None: the same store); a phrase for a message.

        A split that only one side holds is no difference: a store grows by splits.
        """
        common = set(self.data) & set(other.data)
        if self.only(common).fingerprint == other.only(common).fingerprint:
            return None
        for name in ("format_version", "model", "task", "template"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} {mine or 'none'} here, {theirs or 'none recorded (an older store)'} in the store"
        for name in (f.name for f in dataclasses.fields(ExtractionSettings)):
            mine, theirs = getattr(self.settings, name), getattr(other.settings, name)
            if mine != theirs:
                return f"{name} {mine} here, {theirs} in the store"
        for split in sorted(common):
            mine, theirs = self.data[split], other.data[split]
            if mine.source != theirs.source:
                return f"{split} data from {mine.source} here, from {theirs.source} in the store"
            if mine != theirs:
                return f"{split} data differ from the examples the store was built from (texts, labels or ids changed)"
        return "identity differs"  # unreachable while every field is compared above


@dataclass(frozen=True)
class BackboneInfo:
    """The frozen model, as stage two needs to know it (no model code)."""

    name: str
    revision: str
    family: str  # seq2seq | encoder | decoder
    model_type: str
    d_model: int
    num_states_encoder: int
    num_states_decoder: int
    num_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific facts (T5 output scaling)


@dataclass(frozen=True)
class TaskInfo:
    """The task and how its inputs and label words were presented to the model."""

    name: str
    kind: str  # classification | regression
    label_names: list[str]
    label_words: list[str]  # empty when no LM head scores labels (encoder family)
    label_token_ids: list[int]
    text_fields: list[str]
    template: str


@dataclass(frozen=True)
class StoreLayout:
    """Which states each side keeps and how its rows are cut into blocks and chunks."""

    layers: dict[str, list[int]]  # side -> kept state indices (0: the embedding output)
    per_token: dict[str, bool]  # side -> every token's row (True) or one row per example
    block_rows: dict[str, int]
    chunk_rows: dict[str, int]

    @property
    def sides(self) -> list[str]:
        return list(self.layers)

    @property
    def has_embedding(self) -> dict[str, bool]:
        return {side: layers[0] == 0 for side, layers in self.layers.items()}


@dataclass(frozen=True)
class SplitInfo:
    """One split's counts and whether every block has been written."""

    num_examples: int
    num_blocks: int
    num_tokens: dict[str, int]
    num_rows: dict[str, int]
    complete: bool = False
    # The arithmetic its blocks were computed in (``Backbone.precision``); "" in a store made before it was recorded.
    # Not part of the identity: a finished store is the same store wherever it is read or checked, but a rerun that
    # would add blocks computed otherwise is refused (``StoreWriter.check_precision``).
    precision: str = ""


@dataclass(frozen=True)
class StoreMeta:
    """The whole metadata record of a store."""

    identity: StoreIdentity
    backbone: BackboneInfo
    task: TaskInfo
    layout: StoreLayout
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)  # versions when the store was created
    # Every split an extraction of this store was asked for, recorded as it starts: one stopped before a split
    # began leaves it here and not in ``splits``, so the store reads as unfinished (verify, info, train).
    asked: tuple[str, ...] = ()
    recorded_fingerprint: str | None = field(default=None, compare=False)  # as read from disk

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def settings(self) -> ExtractionSettings:
        return self.identity.settings

    @property
    def consistent(self) -> bool:
        """False if the recorded fingerprint does not hash the recorded identity (edited attributes)."""
        return self.recorded_fingerprint in (None, self.fingerprint)

    def with_split(self, name: str, data: SplitData | None = None, **info: Any) -> StoreMeta:
        """A copy with one split's data identity set and/or its info created or updated."""
        splits = dict(self.splits)
        splits[name] = dataclasses.replace(splits[name], **info) if name in splits else SplitInfo(**info)
        identity = self.identity
        if data is not None:
            identity = dataclasses.replace(identity, data={**identity.data, name: data})
        return dataclasses.replace(self, identity=identity, splits=splits)

    def to_attrs(self) -> dict[str, Any]:
        plain = dataclasses.asdict(self)
        del plain["recorded_fingerprint"]
        return {"format_version": self.identity.format_version, "fingerprint": self.fingerprint, **plain}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any] | None, where: str) -> StoreMeta:
        """The record in a root group's attributes; a one-line StoreFormatError if there is none we read."""
        if not attrs:
            raise StoreFormatError(
                f"{where} is a Zarr group but not a READ activation store (no '{ATTRS_KEY}' attributes)"
            )
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{where} has store format version {version}; this software reads version {FORMAT_VERSION} "
                f"(version 2 added block checksums and the data's identity). Re-extract it: "
                "`pipeline extract ... --overwrite` (or `dvc repro`, which replaces it)"
            )
        try:
            ident = dict(attrs["identity"])
            settings = dict(ident["settings"])
            layers = settings["layers"]
            settings["layers"] = tuple(layers) if layers is not None else None
            identity = StoreIdentity(
                format_version=ident["format_version"], model=ident["model"], task=ident["task"],
                settings=ExtractionSettings(**settings),
                data={k: SplitData(**v) for k, v in ident["data"].items()}, template=ident.get("template", ""),
            )
            return cls(
                identity=identity,
                backbone=BackboneInfo(**attrs["backbone"]),
                task=TaskInfo(**attrs["task"]),
                layout=StoreLayout(**attrs["layout"]),
                splits={k: SplitInfo(**v) for k, v in attrs["splits"].items()},
                software=dict(attrs.get("software", {})),
                asked=tuple(attrs.get("asked", ())),  # not recorded before: ()
                recorded_fingerprint=attrs.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreFormatError(
                f"{where}: the '{ATTRS_KEY}' attributes are malformed ({type(exc).__name__}: {exc}); "
                "re-extract it with `pipeline extract ... --overwrite`"
            ) from None
