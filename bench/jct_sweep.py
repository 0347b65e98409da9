"""`zipserve bench jct --sweep`: the JCT benchmark over codec (x decode_kv mode) x emulated link x
arrival rate.

The system (embedded Ray, one prefill and one decode worker, the router on loopback) is started
once per codec and decode_kv mode (bf16 once: dense in every mode); each link is then set on the
running pairs (`RayBackend.set_link`, only while idle) and each rate replays the same seeded
workload (same lengths, arrival times scaled by the rate) through `jct_client`. Each (link, rate)
cell draws its own token ids (`workloads.build(salt=)`): the system keeps running between cells
and its workers cache prefixes, so replaying one cell's prompts in the next would measure cache
hits (no prefill, no transfer) instead of the link. Codecs see the same ids in the same cell.
Between runs the sweep waits until every decode page is free again. `restart_each=True` starts a fresh
system for every (codec, mode, link, rate) instead (cleaner, slower: model load and warm-up
every time). Each system gets one warm-up request (compiles kernels)
before it is measured.

Writes to `out_dir`: jct_requests.csv (one row per request, config columns first),
jct_summary.csv (one row per configuration), jct_meta.json (device, date, model, command,
commit), and the plots of `jct_plots`. A conversation workload (`multiturn`) also writes
jct_turns.csv (per configuration and turn: JCT, cached tokens, KV bytes sent and not sent;
bench/jct_conversations.py) and serves without a tokenizer, so the client gets each answer's
token ids back for the next turn's prompt. Every row records whether prefix caching was on
(`--engine-option prefix_caching=false` turns it off in every worker).
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zipserve.bench import jct_client, jct_plots, workloads
from zipserve.bench.conversations import CONVERSATION_SHAPES, ConversationWorkload
from zipserve.bench.jct_conversations import print_turns, summarize_turns
from zipserve.control.gil_switch import gil_switch_setting
from zipserve.decode_worker.arrivals import import_during_step
from zipserve.prefill_worker.worker import kv_inflight_prompts

SUMMARY_KEYS = ("codec", "decode_kv", "link_gbps", "rate", "workload", "prefix_caching")


@dataclass(frozen=True)
class SweepConfig:
    model: str
    codecs: tuple[str, ...]
    links: tuple[float | None, ...]
    """Emulated link Gb/s; None: no emulation (the channel's own speed)."""
    rates: tuple[float, ...]
    """Poisson arrival rates, requests/s (ignored for a trace workload: one run per link)."""
    workload: str = "long-doc"
    """A shape of bench/workloads.py or a JSONL trace path."""
    num_requests: int = 32
    seed: int = 0
    scale: float = 1.0
    max_seconds: float = 60.0
    """Bound of one run (arrivals and completions); what is still running then is cut."""
    device: str | None = None
    engine_options: dict = field(default_factory=dict)
    restart_each: bool = False
    num_prefill: int = 1
    num_decode: int = 1
    """Workers of the deployment (each pair's link is emulated separately)."""
    quality_csvs: tuple[str, ...] = ()
    """`zipserve bench quality` CSVs for the perplexity-cost plot (missing: said in the plot)."""
    command: str = ""
    """The command line, recorded in jct_meta.json."""
    decode_kv: tuple[str, ...] = ("compressed",)
    """decode_kv modes each codec runs in (engine/decode_kv.py); records carry the mode the
    decode workers used (`auto` resolved) beside the codec."""
    local_prefill_tokens: int | None = None
    """ServeConfig.local_prefill_tokens of the deployment (None: its default)."""

    def __post_init__(self) -> None:
        if not self.codecs:
            raise ValueError("codecs: name at least one codec")
        if not self.links:
            raise ValueError("links: name at least one link (or 'none')")
        from zipserve.compress.codecs import CODECS

        for c in self.codecs:
            if c not in CODECS:
                raise ValueError(f"codecs: unknown codec {c!r}; known: {', '.join(CODECS)}")
        for g in self.links:
            if g is not None and g <= 0:
                raise ValueError(f"links: Gb/s must be > 0 (or 'none'), got {g}")
        if self.workload in workloads.SHAPES and not self.rates:
            raise ValueError("rates: a built-in workload needs at least one rate")
        if any(r <= 0 for r in self.rates):
            raise ValueError("rates: must be > 0 requests/s")
        if self.max_seconds <= 0:
            raise ValueError("max_seconds: must be > 0")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--prefill-workers / --decode-workers: need at least 1 of each")
        from zipserve.engine.decode_kv import check_decode_kv, codec_modes

        if not self.decode_kv:
            raise ValueError("decode_kv: name at least one mode")
        for m in self.decode_kv:
            check_decode_kv("bf16", m)  # a known mode (codec-specific refusals: codec_modes)
        codec_modes(self.codecs, self.decode_kv)  # raises where dense is all a codec is asked

    @property
    def runs(self) -> list[tuple[str, str, float | None, float | None]]:
        """(codec, decode_kv, link, rate) of every run."""
        from zipserve.engine.decode_kv import codec_modes

        rates = list(self.rates) if self.workload in workloads.SHAPES else [None]
        lanes, _ = codec_modes(self.codecs, self.decode_kv)
        return [(c, m, g, r) for c, m in lanes for g in self.links for r in rates]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def repo_path(path: str) -> str:
    """`path` relative to the repository root when it lies inside it (for published pages)."""
    try:
        return str(Path(path).resolve().relative_to(PACKAGE_ROOT))
    except ValueError:
        return path


def resolve_repo_path(path: str) -> Path:
    """Inverse of repo_path: a relative path is read from the repository root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else PACKAGE_ROOT / p


def git_commit() -> str:
    """The short commit, with "-dirty" when code (not results) has uncommitted changes."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=10
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = head and git(
            "status", "--porcelain", "--untracked-files=no", "--", "*.py", "pyproject.toml"
        )
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


@contextmanager
def _system(cfg: SweepConfig, codec: str, decode_kv: str):
    from zipserve.control.config import ServeConfig
    from zipserve.deploy.serve import freeze_startup_objects, running_server

    # On one GPU the backend sizes the prefill and decode pools so both fit (control/placement.py)
    scfg = ServeConfig(
        model=cfg.model,
        codec=codec,
        device=cfg.device,
        link_gbps=None,
        num_prefill=cfg.num_prefill,
        num_decode=cfg.num_decode,
        engine_options=dict(cfg.engine_options),
        decode_kv=decode_kv,
        # a conversation's next prompt holds the answer's token ids: served back without one
        skip_tokenizer=cfg.workload in CONVERSATION_SHAPES,
        **(
            {}
            if cfg.local_prefill_tokens is None
            else {"local_prefill_tokens": cfg.local_prefill_tokens}
        ),
    )
    t0 = time.time()
    with running_server(scfg, "127.0.0.1", 0) as (base, backend):
        t1 = time.time()
        _warm_up(base)
        freeze_startup_objects()  # again: the warm-up compiled kernels and built objects
        print(
            f"{codec} (decode-kv {backend.decode_kv}): system up in {t1 - t0:.1f} s, warm-up "
            f"{time.time() - t1:.1f} s ({backend.device})",
            flush=True,
        )
        yield base, backend


def _warm_up(base: str) -> None:
    """One short request, so the first measured one does not pay for kernel compilation."""
    import httpx

    r = httpx.post(
        f"{base}/v1/completions",
        timeout=600,
        json={
            "prompt": list(range(3, 200)),
            "max_tokens": 4,
            "min_tokens": 4,
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:300]}")


def _drain(backend, timeout_s: float = 120.0) -> None:
    end = time.time() + timeout_s
    while not backend.idle():
        if time.time() > end:
            raise RuntimeError("the system did not return to idle after a run (pages held)")
        time.sleep(0.1)


def _vocab(model: str) -> int:
    from zipserve.engine.loading import model_config_for

    return model_config_for(model).vocab_size


def _one_run(
    cfg: SweepConfig,
    base: str,
    backend,
    client: ProcessPoolExecutor,
    codec: str,
    link: float | None,
    rate: float | None,
    vocab: int,
) -> tuple[list[dict], dict, list[dict]]:
    wl = workloads.build(
        cfg.workload,
        rate=rate,
        num_requests=cfg.num_requests,
        seed=cfg.seed,
        scale=cfg.scale,
        vocab=vocab,
        salt=f"@{link}/{rate}",
    )
    t0 = time.time()
    results = client.submit(jct_client.replay, base, wl, max_seconds=cfg.max_seconds).result()
    wall = time.time() - t0
    usage = backend.link_usage(wall) if link is not None else None
    _drain(backend)
    conf = {
        "codec": codec,
        "decode_kv": backend.decode_kv,
        "link_gbps": "none" if link is None else link,
        "rate": "trace" if rate is None else rate,
        "workload": wl.name,
        "prefix_caching": "off" if cfg.engine_options.get("prefix_caching") is False else "on",
        "local_prefill_tokens": backend.cfg.local_prefill_tokens,
    }
    rows = [{**conf, **r.row()} for r in results]
    s = jct_client.summarize(results)
    done = [r for r in results if r.status == "ok"]
    s.update(conf)
    s["run_seconds"] = wall
    s["link_busy"] = float("nan") if usage is None else usage.busy
    s["link_handoff"] = float("nan") if usage is None else usage.handoff
    s["link_ack_wait"] = float("nan") if usage is None else usage.ack_wait
    s["completed_per_s"] = len(done) / wall if wall > 0 else float("nan")
    title = f"{jct_plots.lane(conf):>20} link {conf['link_gbps']!s:>5} rate {conf['rate']!s:>5}"
    jct_client.print_summary(title, s)
    turns = []
    if isinstance(wl, ConversationWorkload):
        per_turn = summarize_turns(results)
        print_turns(title, per_turn)
        turns = [{**conf, **t} for t in per_turn]
    return rows, s, turns


def run(cfg: SweepConfig, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Run every configuration, write the CSVs, meta and plots; return (requests, summary)."""
    import ray

    from zipserve.deploy.serve import start_ray

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(cfg.model)
    runs = cfg.runs
    from zipserve.engine.decode_kv import codec_modes

    lanes, skipped = codec_modes(cfg.codecs, cfg.decode_kv)
    for note in skipped:
        print(f"(skipped {note})")
    print(
        f"JCT sweep: {len(runs)} runs ({len(lanes)} codec x decode-kv lanes x {len(cfg.links)} "
        f"links x {len(runs) // (len(lanes) * len(cfg.links))} rates), each at most "
        f"{cfg.max_seconds:g} s; worst case {len(runs) * cfg.max_seconds / 60:.1f} min plus "
        f"{len(lanes) if not cfg.restart_each else len(runs)} system starts"
    )
    own_ray = not ray.is_initialized()
    start_ray(None)
    rows: list[dict] = []
    summary: list[dict] = []
    turns: list[dict] = []
    device = None
    # The load generator runs in its own process, so it does not compete with the router
    # for one interpreter (its GIL, its garbage collector).
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        groups: dict = {}
        for codec, mode, link, rate in runs:
            key = (codec, mode, link, rate) if cfg.restart_each else (codec, mode)
            groups.setdefault(key, []).append((codec, mode, link, rate))
        for items in groups.values():
            codec, mode = items[0][:2]
            with _system(cfg, codec, mode) as (base, backend):
                device = device or backend.device
                current: object = ()  # set on the first run: a link with a long busy history
                for codec_, _mode, link, rate in items:
                    if link != current:
                        backend.set_link(link)
                        current = link
                    r, s, t = _one_run(cfg, base, backend, client, codec_, link, rate, vocab)
                    rows += r
                    summary.append(s)
                    turns += t
                    # every finished run on disk at once: a sweep cut short (a time limit's
                    # SIGINT, a crash) keeps what it measured, marked partial in its meta
                    write_tables(cfg, out_dir, rows, summary, device, turns, len(runs))
    finally:
        client.shutdown(cancel_futures=True)
        if own_ray:
            ray.shutdown()
    if not rows:
        raise RuntimeError("the sweep produced no rows")
    write_outputs(cfg, out_dir, rows, summary, device or "cpu", turns)
    return rows, summary


def write_outputs(
    cfg: SweepConfig,
    out_dir: Path,
    rows: list[dict],
    summary: list[dict],
    device: str,
    turns: list[dict] | None = None,
) -> None:
    """The finished sweep: its tables and meta (write_tables), then the plots."""
    ordered = write_tables(cfg, out_dir, rows, summary, device, turns)
    pngs = jct_plots.plot_all(out_dir, ordered, rows, list(cfg.quality_csvs))
    print(
        f"wrote {out_dir}/jct_requests.csv, jct_summary.csv, jct_meta.json"
        + (f" and {', '.join(p.name for p in pngs)}" if pngs else "")
    )


def write_tables(
    cfg: SweepConfig,
    out_dir: Path,
    rows: list[dict],
    summary: list[dict],
    device: str,
    turns: list[dict] | None = None,
    runs_planned: int | None = None,
) -> list[dict]:
    """jct_requests.csv, jct_summary.csv (and jct_turns.csv) and jct_meta.json of the runs so
    far; runs_planned (while the sweep goes on) records them as `runs_done` of `runs_planned`
    in the meta, which `bench report` shows. Returns the summary rows in column order."""
    jct_client.write_csv(out_dir / "jct_requests.csv", rows)
    if turns:
        jct_client.write_csv(out_dir / "jct_turns.csv", turns)
    first = list(SUMMARY_KEYS)
    ordered = [{k: s[k] for k in first + [k for k in s if k not in first]} for s in summary]
    jct_client.write_csv(out_dir / "jct_summary.csv", ordered)
    conf = {k: v for k, v in asdict(cfg).items() if k != "command"}
    conf["model"] = repo_path(cfg.model)
    conf["quality_csvs"] = [repo_path(p) for p in cfg.quality_csvs]
    meta = {
        "device": device_name(device),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": conf["model"],
        "commit": git_commit(),
        "command": cfg.command,
        "config": conf,
        "gil_switch_ms": gil_switch_setting(),
        "import_during_step": import_during_step(),
        "kv_inflight_prompts": kv_inflight_prompts(),
    }
    if runs_planned is not None and len(summary) < runs_planned:
        meta.update(runs_done=len(summary), runs_planned=runs_planned)
    (out_dir / "jct_meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return ordered
