"""The shipped tiny-world models, as local directories (nothing is ever downloaded).

    from hivis_testbed import assets
    assets.tiny_target()   # LLaVA target trained on the tiny world (safetensors + processor)
    assets.tiny_drafter()  # hivis drafter trained for it
    assets.baseline(kind)  # baselines on the hivis drafter's data and budget: "text", "eagle", "vispec"
    assets.variant(kind)   # (target, drafter) of another family: "next" (LLaVA-NeXT)

Each directory carries provenance.json: the command, seed, commit and metrics that made it.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "assets"
NAMES = {"tiny_target": "tiny-target", "tiny_drafter": "tiny-drafter"}


def _dir(name: str) -> str:
    d = ROOT / name
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"shipped asset {name!r} is missing at {d}; it is committed with the repo "
                                "(see README.md 'Tiny world' to rebuild it)")
    return str(d)


def tiny_target() -> str:
    return _dir(NAMES["tiny_target"])


def tiny_drafter() -> str:
    return _dir(NAMES["tiny_drafter"])


BASELINES = ("text", "eagle", "vispec")


def baseline(kind: str) -> str:
    """A shipped baseline drafter: "text" (hivis format, no target features), "eagle" (vLLM's EAGLE
    format, sees image rows), "vispec" (ViSpec-style, offline evaluation only)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    d = ROOT / "baselines" / kind
    if not d.is_dir() or not any(d.glob("*.json")):
        raise FileNotFoundError(f"baseline drafter {kind!r} is missing at {d}; it is committed with the repo "
                                "(rebuild: bash scripts/build_assets.sh baselines)")
    return str(d)


# shipped variants (built by hivis_testbed.tinyworld.variants: `bash scripts/build_assets.sh variants`)
VARIANTS = {"next": "LLaVA-NeXT", "qwen": "Qwen2.5-VL"}


def variant(kind: str) -> tuple[str, str]:
    """(target, drafter) directories of a tiny-world target of another family, warm-started from
    the LLaVA-1.5 target (hivis_testbed.tinyworld.variants), and its hivis drafter."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown target variant {kind!r}; expected one of {tuple(VARIANTS)}")
    return _dir(f"{kind}/target"), _dir(f"{kind}/drafter")


def all_assets() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for fn, name in NAMES.items():
        try:
            out[fn] = _dir(name)
        except FileNotFoundError:
            out[fn] = None
    for kind in BASELINES:
        try:
            out[f"baseline_{kind}"] = baseline(kind)
        except FileNotFoundError:
            out[f"baseline_{kind}"] = None
    for kind in VARIANTS:
        for role in ("target", "drafter"):
            d = ROOT / kind / role
            out[f"{kind}_{role}"] = str(d) if (d / "config.json").is_file() else None
    return out


def main(argv=None) -> int:
    """``hivis-testbed assets``: the shipped model directories as JSON."""
    import json

    print(json.dumps(all_assets(), indent=2))
    return 0
