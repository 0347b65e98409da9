"""`ServeConfig`: what `zipserve serve` starts (model, codecs, workers, limits, placement),
validated where it is built: a bad flag, or a model a worker would refuse at load, fails here
with the flag's name, before any actor starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zipserve.engine.loading import model_config_for


@dataclass
class ServeConfig:
    """What `zipserve serve` starts."""

    model: str
    codec: str = "bf16"
    """The deployment's KV codec: requests that name none use it."""
    extra_codecs: tuple[str, ...] = ()
    """More codecs served beside `codec`, each by its own prefill and decode workers
    (control/multi_codec.py); a request picks one with its `codec` field."""
    num_prefill: int = 1
    num_decode: int = 1
    device: str | None = None
    """'cuda', 'cpu' or None (GPU when Ray sees one)."""
    link_gbps: float | None = None
    """Emulated link bandwidth between prefill and decode (None: as fast as the channel)."""
    link_latency_ms: float = 0.0
    transfer_deadline_s: float = 30.0
    engine_options: dict = field(default_factory=dict)
    max_restarts: int = 3
    """Times Ray restarts a worker actor that died (then it stays dead)."""
    retries: int = 1
    """Times a job whose worker failed before its first token is tried again on another pair."""
    page_wait_s: float = 30.0
    """Longest a job waits for a healthy pair whose decode worker has pages for it."""
    health_interval_s: float = 0.5
    """How often every worker is asked for its stats (and restarts are noticed)."""
    prefix_affinity: bool = True
    """With several decode workers, send a request to the one whose prefix cache holds the
    longest leading part of its prompt (fewer pages to send, none to store twice), among those
    within `affinity_slack_tokens` of the least loaded (control/affinity.py)."""
    affinity_slack_tokens: int = 4096
    """How much more load (prompt + max tokens of the requests it holds) a decode worker may
    carry than the least loaded one and still be preferred for the prefix it holds."""
    local_prefill_tokens: int = 128
    """When the decode worker holds part of a prompt (its prefix cache) and at most this many
    prompt tokens are left, it computes them itself and nothing crosses the link (0: never).
    128 tokens: on a GPU about one decode step of an 8B model, less than a prefill worker's
    round trip (stated, not measured on a GPU; bench/JCT_RESULTS.md has the CPU runs)."""
    prefill_resource: str | None = None
    """A custom Ray resource each prefill actor needs one unit of (pins them to nodes that
    offer it, e.g. a KubeRay prefill worker group); None: no custom resource."""
    decode_resource: str | None = None
    """The same for decode actors."""
    prefill_group: int = 0
    """Workers of the sequence-parallel prefill group (0: none); see prefill_group/."""
    prefill_group_min_tokens: int = 16384
    """Prompts of at least this many tokens go to the group."""
    prefill_group_exchange: str = "lowrank"
    """With a lowrank codec: "lowrank" exchanges projected Q/K/V, "full" the full ones."""
    served_model_name: str | None = None
    """The model's name in the API (/v1/models, a request's `model`); None: the last part of
    `model` (a checkpoint's directory name, never its absolute path)."""
    decode_kv: str = "auto"
    """What decode workers keep of the codec's KV (engine/decode_kv.py): compressed, dense or
    auto (the default: each decode worker picks from its device and the measured kernel speeds;
    dense on the CPU, compressed for hack on an H100); one mode for every lane, or one per codec separated by commas in `codecs` order.
    Only decode workers get it: prefill workers always send the codec's wire form."""
    skip_tokenizer: bool = False
    """Serve without a tokenizer (`--skip-tokenizer`; engine/no_tokenizer.py): prompts are token
    ids, completions answer with token ids and empty text, text prompts, chat and stop strings
    get a 400 naming the field. Passed to every worker's engine."""

    @property
    def model_name(self) -> str:
        return self.served_model_name or served_name(self.model)

    @property
    def codecs(self) -> tuple[str, ...]:
        """Every codec served, the default first."""
        return (self.codec,) + tuple(self.extra_codecs)

    @property
    def decode_kv_modes(self) -> dict[str, str]:
        """codec -> its lane's decode_kv."""
        modes = [m.strip() for m in self.decode_kv.split(",")]
        return dict(zip(self.codecs, modes * len(self.codecs) if len(modes) == 1 else modes))

    def __post_init__(self) -> None:
        from zipserve.compress.codecs import codec_entry

        self.extra_codecs = tuple(self.extra_codecs)
        for c in self.codecs:
            try:
                codec_entry(c)
            except ValueError as e:
                raise ValueError(f"--{e}") from None
        if len(set(self.codecs)) != len(self.codecs):
            raise ValueError(f"--codec: a codec is named twice in {','.join(self.codecs)}")
        from zipserve.engine.config import EngineConfig

        if self.engine_options.get("skip_tokenizer") is True:  # --engine-option skip_tokenizer=true
            self.skip_tokenizer = True
        if self.skip_tokenizer:
            self.engine_options = {**self.engine_options, "skip_tokenizer": True}
        try:  # the workers build exactly this; refuse here, not as a Ray actor traceback
            EngineConfig(codec=self.codec, **self.engine_options)
        except (TypeError, ValueError) as e:  # unknown field / bad value
            raise ValueError(f"--engine-option: {e}") from None
        self._check_model()
        if "decode_kv" in self.engine_options:
            raise ValueError(
                "--engine-option: decode_kv applies to decode workers only; use --decode-kv"
            )
        self._check_decode_kv()
        bases = str(self.engine_options.get("lowrank_bases") or self.model)
        from zipserve.compress.lowrank_bases import BASES_FILE

        lowrank = [c for c in self.codecs if codec_entry(c).calibration == BASES_FILE]
        if lowrank and not bases.startswith("random:") and not (Path(bases) / BASES_FILE).is_file():
            raise ValueError(
                f"--codec: {lowrank[0]} needs calibrated bases at "
                f"{Path(bases) / BASES_FILE}; create them with "
                f"`zipserve calibrate --model {self.model}`"
            )
        if "hack2mix" in self.codecs and not str(self.model).startswith("random:"):
            from zipserve.compress.kvbits import load_bits

            load_bits(self.model)  # a missing/invalid kvbits.json, named, before any worker starts
        if self.extra_codecs and self.prefill_group:
            raise ValueError("--prefill-group: serves one codec; not with several in --codec")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name: must not be empty")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--prefill and --decode: need at least one worker of each")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if (
            isinstance(self.local_prefill_tokens, bool)
            or not isinstance(self.local_prefill_tokens, int)
            or self.local_prefill_tokens < 0
        ):
            raise ValueError(
                f"--local-prefill-tokens: must be an integer >= 0, got "
                f"{self.local_prefill_tokens!r}"
            )
        if not isinstance(self.prefix_affinity, bool):
            raise ValueError(f"prefix_affinity: must be a bool, got {self.prefix_affinity!r}")
        if (
            isinstance(self.affinity_slack_tokens, bool)
            or not isinstance(self.affinity_slack_tokens, int)
            or self.affinity_slack_tokens < 0
        ):
            raise ValueError(
                f"--affinity-slack-tokens: must be an integer >= 0, got "
                f"{self.affinity_slack_tokens!r}"
            )
        if self.link_gbps is not None and not (
            isinstance(self.link_gbps, (int, float))
            and not isinstance(self.link_gbps, bool)
            and self.link_gbps > 0
        ):
            raise ValueError(
                f"--link-gbps: must be a number > 0 (None: no emulated link), got {self.link_gbps!r}"
            )
        for name in ("transfer_deadline_s", "page_wait_s", "health_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("prefill_resource", "decode_resource"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty resource name")
        from zipserve.prefill_group.config import validate_group

        self.group = validate_group(
            self.model,
            self.prefill_group,
            self.prefill_group_min_tokens,
            self.engine_options.get("page_size", 64),
            self.prefill_group_exchange,
        )

    def _check_model(self) -> None:
        """What the workers would refuse at load, refused before any of them starts: a head
        size a codec cannot take, a model directory without tokenizer.json."""
        from zipserve.compress.codecs import check_head_dim

        try:
            head_dim = model_config_for(self.model).head_dim
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
        for c in self.codecs:
            try:
                check_head_dim(c, head_dim)
            except ValueError as e:
                raise ValueError(f"--codec: {e}") from None
        if (
            not self.skip_tokenizer
            and not self.model.startswith("random:")
            and not (Path(self.model) / "tokenizer.json").is_file()
        ):
            raise ValueError(
                f"--model: no tokenizer.json in {self.model}; to serve it on token "
                f"ids (prompts as lists of ids, no text out) pass --skip-tokenizer"
            )

    def _check_decode_kv(self) -> None:
        from zipserve.engine.decode_kv import check_decode_kv

        if not isinstance(self.decode_kv, str):
            raise ValueError(f"--decode-kv: must be a string, got {self.decode_kv!r}")
        modes = [m.strip() for m in self.decode_kv.split(",")]
        if len(modes) not in (1, len(self.codecs)):
            raise ValueError(
                f"--decode-kv: give one mode, or one per codec ({len(self.codecs)}:"
                f" {','.join(self.codecs)}), got {self.decode_kv!r}"
            )
        for codec, mode in self.decode_kv_modes.items():
            try:
                check_decode_kv(codec, mode)
            except ValueError as e:
                raise ValueError(f"--decode-kv: {str(e).removeprefix('decode_kv: ')}") from None


def served_name(model: str) -> str:
    """ "/abs/path/models/zipserve-ref" -> "zipserve-ref"; "random:tiny" stays as it is."""
    return Path(model.rstrip("/")).name or model if "/" in model else model
