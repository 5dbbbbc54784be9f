"""CLI for the network: train, evaluate, model-stats, export (import-light: heavy imports inside)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlheir.errors import UserError
from dlheir.extras import needs
from dlheir.export.defaults import add_train_arguments, config_from_args

STATE = "the state folder ($DLHEIR_STATE, else $XDG_STATE_HOME/dlheir, else ~/.local/state/dlheir)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train DLHEIR on an image folder or the bundled digits",
                       description="Train DLHEIR (or the baseline) with SGD; saves RUN_DIR/model.pt each epoch. "
                                   "Defaults: the digits demo; the paper's values are shown beside them.")
    add_train_arguments(p)
    p.set_defaults(func=_train)
    needs(p, "train")

    p = sub.add_parser("evaluate", help="precision@k and mAP of a checkpoint (Hamming ranking)",
                       description="Database = train split, queries = query split; ties broken by (distance, id).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None,
                   help="image folder or 'digits' (default: the data recorded in the checkpoint; 'digits' "
                        "for an older checkpoint that records none)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write the metrics here (default RUN_DIR/eval.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.set_defaults(func=_evaluate)
    needs(p, "train")

    p = sub.add_parser("model-stats", help="parameters and FLOPs of DLHEIR vs the baseline, beside Table 2",
                       description="Counts parameters and FLOPs (torch.utils.flop_counter, FLOPs = 2 x MACs) of "
                                   "DLHEIR and the baseline for one forward pass of one image, and prints them "
                                   "beside the paper's Table 2 figures (whose units do not match DenseNet201).")
    p.add_argument("--bits", type=int, default=48, help="code length (default 48)")
    p.add_argument("--image-size", type=int, default=384, help="input side (default 384, the paper's)")
    p.add_argument("--num-classes", type=int, default=100, help="classifier outputs (default 100, Corel10K)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the rows as JSON here")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.set_defaults(func=_model_stats)
    needs(p, "train")

    exp = sub.add_parser("export", help="export a checkpoint to ONNX or an ONNX graph to TensorRT")
    esub = exp.add_subparsers(dest="format", metavar="FORMAT")
    p = esub.add_parser("onnx", help="ONNX graph: IMAGE uint8 [B,S,S,3] -> PROBS, CODE; installed for Triton",
                        description=f"Writes the graph (default STATE/exports/model.onnx, STATE being {STATE}) and "
                                    "installs it as a new version of dlheir_onnx_cpu in the model repository "
                                    "(default STATE/model_repository, what 'dlheir triton start' serves).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="ONNX file (default STATE/exports/model.onnx)")
    p.add_argument("--model-repository", default=None,
                   help="install into this repository (default STATE/model_repository)")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_export_onnx)
    needs(p, "train")
    p = esub.add_parser("tensorrt", help="TensorRT engine (needs a CUDA GPU and the tensorrt package)",
                        description="Builds an engine from the ONNX graph; ENGINE.json beside it records the "
                                    "fingerprint of that graph, which the engine's Triton model then carries.")
    p.add_argument("--onnx", default=None, help="ONNX graph (default: the latest 'dlheir export onnx')")
    p.add_argument("--out", default=None, help="engine file (default STATE/exports/model.plan)")
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels (the codes are compared with --compare)")
    p.add_argument("--max-batch", type=int, default=64, help="optimization profile covers batch 1..max (default 64)")
    p.add_argument("--compare", metavar="DATA", default=None,
                   help="after building, compare the engine's codes with the ONNX (FP32) codes on DATA "
                        "('digits' or an image folder): fraction of differing bits and P@20 of both")
    p.set_defaults(func=_export_tensorrt)
    needs(p, "train")


def _check_file(path: str, what: str) -> None:
    """The cheap checks of a path argument, before torch loads (a typo answers at once)."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")


def _train(args: argparse.Namespace) -> int:
    from dlheir.export.data import check_data_spec

    cfg = config_from_args(args).validate()
    check_data_spec(cfg.data)  # before torch loads: a wrong --data answers at once
    from dlheir.export.train import train

    path = train(cfg)
    print(f"checkpoint: {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _check_file(args.checkpoint, "checkpoint")
    if args.data is not None:
        from dlheir.export.data import check_data_spec

        check_data_spec(args.data)
    from dlheir.export.train import evaluate, format_metrics

    out = args.json_out or str(Path(args.checkpoint).parent / "eval.json")
    result = evaluate(args.checkpoint, args.data, out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['arch']} {result['bits']} bits, {result['image_size']}px: "
          f"{result['queries']} queries against {result['database']} database images")
    hint = "; --data to use another" if result["data_source"] == "recorded in the checkpoint" else ""
    print(f"data: {result['data']} ({result['data_source']}{hint})")
    print(format_metrics(result))
    print(f"written: {out}")
    return 0


def _model_stats(args: argparse.Namespace) -> int:
    from dlheir.contract import validate_bits
    from dlheir.export.stats import format_stats, model_stats

    validate_bits(args.bits)
    rows = model_stats(args.bits, args.image_size, args.num_classes)
    print(json.dumps(rows, indent=2) if args.json else format_stats(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    _check_file(args.checkpoint, "checkpoint")
    from dlheir.export.checkpoint import load_checkpoint
    from dlheir.export.onnx_export import export_onnx
    from dlheir.triton.repository import default_repository, exports_dir, prepare_repository, record_export

    model, meta = load_checkpoint(args.checkpoint)
    path = export_onnx(model, args.out or exports_dir() / "model.onnx", meta["image_size"], args.opset)
    record_export(path)
    print(f"ONNX written: {path} (IMAGE uint8 [B,{meta['image_size']},{meta['image_size']},3] -> "
          f"PROBS [B,{meta['bits']}], CODE [B,{(meta['bits'] + 7) // 8}])")
    repo = prepare_repository(args.model_repository or default_repository(), path, "onnx-cpu")
    print(f"installed for Triton: {repo.describe()}")
    if repo.new_version:
        print("a running tritonserver keeps serving the previous version: 'dlheir triton stop' and "
              "'dlheir triton start' to serve this one")
    return 0


def _export_tensorrt(args: argparse.Namespace) -> int:
    from dlheir.export.tensorrt_export import build_engine
    from dlheir.triton.repository import exports_dir, latest_export

    args.onnx = args.onnx or latest_export()
    args.out = args.out or exports_dir() / "model.plan"
    if not Path(args.onnx).is_file():
        raise UserError(f"ONNX file not found: {args.onnx} (run 'dlheir export onnx' first)")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {args.max_batch}")
    facts = build_engine(args.onnx, args.out, args.fp16, args.max_batch)
    if args.compare:
        from dlheir.export.tensorrt_export import compare_fp16_fp32

        facts["comparison"] = compare_fp16_fp32(args.out, args.onnx, args.compare)
    print(json.dumps(facts, indent=2))
    return 0
