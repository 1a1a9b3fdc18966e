"""``qscope-rl releases`` and ``qscope-rl sae-info``: what SAEs exist, and what one on disk holds."""

from __future__ import annotations

from qscope_rl.sae.loaders import load_sae
from qscope_rl.sae.releases import QWEN_SCOPE_RELEASES

from .common import print_json
from .errors import non_negative_int, positive_int


def register(subparsers) -> None:
    releases = subparsers.add_parser(
        "releases", help="list the Qwen-Scope SAE releases: Hub repo and SAELens name (load_sae takes either, with "
        "layer=L or sae_id='layer<L>')")
    releases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    releases.set_defaults(func=_releases)

    info = subparsers.add_parser("sae-info", help="load an SAE and print its shape and statistics")
    info.add_argument("source", help="local folder/file, Hub repo id, model name, or SAELens Qwen-Scope release name")
    info.add_argument("--layer", type=non_negative_int, default=None)
    info.add_argument("--sae-id", default=None,
                      help="SAELens sae_id: 'layer<L>' for Qwen-Scope, or the subfolder of a SAELens-format repo")
    info.add_argument("--k", type=positive_int, default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_sae_info)


def _releases(args) -> None:
    rows = [dict(repo_id=r.repo_id, saelens_release=r.saelens_release, model=r.model, layers=r.num_layers,
                 d_model=r.d_model, d_sae=r.d_sae, k=r.k, sae_ids=f"layer0..layer{r.num_layers - 1}")
            for r in QWEN_SCOPE_RELEASES]
    if args.json:
        print_json(rows)
        return
    print(f"{'repo':<46} {'SAELens release':<39} {'layers':>6} {'d_model':>7} {'d_sae':>7} {'k':>4}")
    for row in rows:
        print(f"{row['repo_id']:<46} {row['saelens_release']:<39} {row['layers']:>6} {row['d_model']:>7} "
              f"{row['d_sae']:>7} {row['k']:>4}")


def _sae_info(args) -> None:
    sae = load_sae(args.source, args.layer, sae_id=args.sae_id, k=args.k)
    norms = sae.W_dec.norm(dim=0)
    info = dict(source=sae.source, architecture=sae.architecture, layer=sae.layer, d_in=sae.d_in,
                d_sae=sae.d_sae, k=sae.k, dtype=str(sae.W_enc.dtype).removeprefix("torch."),
                apply_b_dec_to_input=sae.apply_b_dec_to_input,
                decoder_norm_mean=float(norms.mean()), decoder_norm_std=float(norms.std()),
                parameters=sum(p.numel() for p in sae.parameters()))
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value}")
