"""`dlheir demo`: the whole pipeline, end to end, on real servers.

Train DLHEIR -> offline evaluation -> ONNX export -> Triton + cloud server on loopback ->
owner KeyGen, collection, encrypted upload of the database split -> user key pair and
grant -> every query searched through the served pipeline -> top results decrypted and
checked against the originals -> served metrics compared with the offline ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from dlheir.contract import PUBLIC_MODEL
from dlheir.errors import UserError

from dlheir.export.defaults import DIGITS_DEMO as DIGITS_DEFAULTS, PAPER as PAPER_DEFAULTS  # noqa: E402
from dlheir.extras import needs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline end to end (what `make demo` runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (bundled, default) or an image folder (e.g. Corel10K)")
    p.add_argument("--work-dir", default=None,
                   help="where the demo keeps its files (default runs/demo, with --quick runs/demo-quick)")
    for key in DIGITS_DEFAULTS:
        p.add_argument(f"--{key.replace('_', '-')}", type=type(DIGITS_DEFAULTS[key]), default=None,
                       help=f"digits: {DIGITS_DEFAULTS[key]}, image folder: {PAPER_DEFAULTS[key]} with CUDA, "
                            f"{DIGITS_DEFAULTS[key]} without")
    p.add_argument("--model", default=PUBLIC_MODEL,
                   help=f"Triton model the demo calls (default {PUBLIC_MODEL}, the public ensemble)")
    p.add_argument("--retrain", action="store_true", help="train again even if the work dir has a finished checkpoint")
    p.add_argument("--quick", action="store_true",
                   help=f"a first run in a few minutes: the same pipeline with {QUICK['image_size']} px images and "
                        f"{QUICK['epochs']} epochs (flags given still win); the full run is the default")
    p.add_argument("--store", default=None, metavar="URL",
                   help="run the cloud server on PostgreSQL (postgresql://..., an empty database) instead of its "
                        "embedded store; make demo-engines starts a throwaway PostgreSQL and Ceph RGW for this")
    p.add_argument("--blobs", default=None, metavar="URL",
                   help="with --store: the blobs in an S3-compatible object store (s3://BUCKET?endpoint=URL)")
    p.set_defaults(func=run_demo)
    needs(p, "train")


# `dlheir demo --quick` (make demo's first run): smaller images and fewer epochs, the rest unchanged
QUICK = {"image_size": 32, "epochs": 2}
SHEET_QUERIES, SHEET_K = 6, 5  # the contact sheet: one query per class (up to 6), its top 5


def pick_settings(data: str, given: dict, cuda: bool) -> tuple[dict, str | None]:
    """Training settings for the demo and an optional one-line warning.

    ``given`` maps each setting to the user's value, or None where the flag was not given.
    Digits: the digits demo's settings. An image folder: the paper's settings on a CUDA machine;
    without CUDA, the settings not given explicitly fall back to the digits demo's (the paper's
    384 px, 200 epochs and ImageNet download do not finish on a CPU), with a warning that names
    the flags that ask for the paper's settings.
    """
    base = PAPER_DEFAULTS if cuda and data != "digits" else DIGITS_DEFAULTS
    cfg = {k: given.get(k) if given.get(k) is not None else v for k, v in base.items()}
    if data == "digits":
        return cfg, None
    swapped = [k for k in PAPER_DEFAULTS if given.get(k) is None and cfg[k] != PAPER_DEFAULTS[k]]
    if not swapped:
        return cfg, None
    flags = lambda d: " ".join(f"--{k.replace('_', '-')} {d[k]}" for k in swapped)  # noqa: E731
    return cfg, (f"warning: no CUDA GPU, so training on the CPU with {flags(cfg)} instead of the paper's settings; "
                 f"ask for those with {flags(PAPER_DEFAULTS)}")


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if len(values) else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from dlheir.export.data import check_data_spec

    check_data_spec(args.data)  # before torch loads: a wrong --data answers at once
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import OwnerKeys, generate_user_keypair, make_grant, open_grant, CodeTransform
    from dlheir.client.owner import create_collection, model_binding, upload_images
    from dlheir.client.private import open_local
    from dlheir.client.triton import TritonHasher
    from dlheir.client.user import search_image
    from dlheir.ids import keyed_path_id
    from dlheir.export import metrics
    from dlheir.export.checkpoint import load_checkpoint, read_checkpoint
    from dlheir.export.data import resolve_data, split_dataset
    from dlheir.export.onnx_export import export_onnx
    from dlheir.export.train import TrainConfig, data_spec, evaluate, train
    from dlheir.server.testing import CloudServerProcess
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import prepare_repository
    from dlheir.contact_sheet import SheetHit, SheetRow, contact_sheet
    from dlheir.progress import progress

    t_start = time.perf_counter()
    import torch

    given = {k: getattr(args, k) for k in DIGITS_DEFAULTS}
    if args.quick:
        given.update({k: v for k, v in QUICK.items() if given.get(k) is None})
    cfg, warning = pick_settings(args.data, given, torch.cuda.is_available())
    if warning:
        print(warning)
    work = Path(args.work_dir or ("runs/demo-quick" if args.quick else "runs/demo"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"data": args.data, **cfg}

    # 1. train (reuse a finished checkpoint of the same settings, resume an interrupted one)
    ckpt = work / "model.pt"
    done_epochs = None  # epochs of a checkpoint of these same settings
    if ckpt.exists() and not args.retrain:
        try:
            old = read_checkpoint(ckpt)
            load_checkpoint(ckpt)  # same layout as this version of the model?
            # the config records the run's target epochs, "epoch" the finished ones
            same = all(old["config"].get(k) == v for k, v in cfg.items()) \
                and old["config"].get("data") in (args.data, data_spec(args.data))
            done_epochs = min(old["epoch"], cfg["epochs"]) if same else None
        except UserError:
            done_epochs = None
    print(f"== 1. train DLHEIR ({cfg['bits']} bits, {cfg['image_size']}px, {cfg['epochs']} epochs) on {args.data}"
          f"{' (quick run)' if args.quick else ''}; Ctrl-C is safe: run the same command again to resume "
          "from the last finished epoch")
    t0 = time.perf_counter()
    if done_epochs == cfg["epochs"]:
        print(f"reusing {ckpt} (same settings; --retrain to train again)")
    elif done_epochs is not None:
        print(f"resuming {ckpt} after epoch {done_epochs}/{cfg['epochs']} (same settings; --retrain to start over)")
        train(TrainConfig(data=args.data, out=str(work), resume=True, **cfg))
    else:
        if ckpt.exists():
            print(f"replacing {ckpt} (other settings, or --retrain)")
        train(TrainConfig(data=args.data, out=str(work), force=True, **cfg))
    summary["train_seconds"] = time.perf_counter() - t0

    # 2. offline evaluation
    print("== 2. offline evaluation (PyTorch)")
    collection, private_collection = "demo", "demo-private"
    # KeyGen first: the key file records each collection's random uid and mode (their keys derive
    # from them); item ids are keyed with the collection's id key (the server cannot compute them),
    # and the offline ranking breaks ties by the same ids the server will hold
    keys = OwnerKeys.generate().register(collection).register(private_collection, "private")
    id_key = keys.for_collection(collection).id_key
    offline = evaluate(ckpt, args.data, work / "eval.json", id_of=lambda rel: keyed_path_id(id_key, rel))
    root = resolve_data(args.data, cfg["image_size"])
    database, queries, class_names = split_dataset(root, seed=0)

    # 3. export to a model repository of the demo's own
    print("== 3. export ONNX into the Triton model repository")
    repo = work / "model_repository"
    if repo.exists():
        shutil.rmtree(repo)
    model, _ = load_checkpoint(ckpt)
    onnx_path = export_onnx(model, work / "model.onnx", cfg["image_size"])
    served = prepare_repository(repo, onnx_path, "onnx-cpu")
    print(served.describe())

    cloud_dir = work / "cloud"
    if cloud_dir.exists():
        shutil.rmtree(cloud_dir)
    for f in ("owner.key", "user.pem", "user.pub.pem", "private.pages"):
        (work / f).unlink(missing_ok=True)
    triton = TritonServer(served.path, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          state_dir=work / "triton")
    cloud_proc = CloudServerProcess(cloud_dir, store_url=args.store, blobs_url=args.blobs)
    connect_triton = lambda: TritonHasher(triton.grpc_url, model=args.model)  # noqa: E731 - the model --model names
    try:
        print("== 4. start Triton and the cloud server on loopback")
        t0 = time.perf_counter()
        triton.start()
        cloud_proc.start()
        print(f"Triton gRPC {triton.grpc_url} ready, cloud server {cloud_proc.address} ready "
              f"({time.perf_counter() - t0:.1f}s)")

        print("== 5. owner: KeyGen, collection, hashgen via Triton + EncImg + transform + upload")
        keys.save(work / "owner.key")
        # the private collection is given the same ids, so the two rankings compare id for id
        ids = [keyed_path_id(id_key, r.relpath) for r in database]
        with CloudClient(cloud_proc.address) as admin, connect_triton() as hasher:
            model = model_binding(hasher)  # the collections record the served model: codes of another are refused
            owner_token, reader_token = create_collection(admin, collection, cloud_proc.admin_token, model)
        print(f"collection {collection!r} made for model {model.fingerprint} ({model.image_size} px, {model.bits} bits)")
        with CloudClient(cloud_proc.address, owner_token) as cloud, connect_triton() as hasher:
            report = upload_images([(r.relpath, r.path) for r in database], keys, collection, cloud, hasher, ids=ids)
        print(f"uploaded {report.uploaded} images, {report.bytes_uploaded / 1e6:.2f} MB in {report.seconds:.1f}s "
              f"({report.images_per_s:.1f} images/s, {report.mb_per_s:.2f} MB/s)")
        summary["upload"] = {"images": report.uploaded, "mb": report.bytes_uploaded / 1e6,
                             "images_per_s": report.images_per_s, "mb_per_s": report.mb_per_s}
        # the same images in a second collection in private-ranking mode: no code on the server
        with CloudClient(cloud_proc.address) as admin:
            p_owner_token, p_reader_token = create_collection(admin, private_collection, cloud_proc.admin_token, model,
                                                              private=True)
        with CloudClient(cloud_proc.address, p_owner_token) as cloud, connect_triton() as hasher:
            p_report = upload_images([(r.relpath, r.path) for r in database], keys, private_collection, cloud, hasher,
                                     ids=ids)
        print(f"private-ranking collection {private_collection!r}: uploaded {p_report.uploaded} images, codes in "
              f"sealed pages only ({p_report.seconds:.1f}s)")

        print("== 6. user: RSA key pair, grant from the owner")
        priv, pub = generate_user_keypair(work / "user.pem")
        grant_bytes = make_grant(keys, pub.read_bytes(), collection, reader_token, cloud_proc.address, cfg["bits"])
        grant = open_grant(grant_bytes, priv.read_bytes())
        p_grant = open_grant(make_grant(keys, pub.read_bytes(), private_collection, p_reader_token, cloud_proc.address,
                                        cfg["bits"]), priv.read_bytes())

        print(f"== 7. search all {len(queries)} queries through Triton and the cloud server")
        by_id = dict(zip(ids, database))
        with CloudClient(cloud_proc.address, grant.reader_token) as cloud, connect_triton() as hasher:
            # served ranking of the whole database for each query -> the same metrics as offline
            transform = CodeTransform(grant.transform_secret, hasher.bits)
            _, q_codes = hasher.hash_images([r.path for r in queries])
            results = cloud.search(collection, transform.apply(q_codes), k=len(database),
                                   model_fingerprint=hasher.fingerprint)
            ranked_labels = np.array([[by_id[int(i)].label for i in ids] for ids, _ in results])
            served = metrics.summarize(metrics.relevance(ranked_labels, np.array([r.label for r in queries])))
            # the user flow, one query at a time: trapdoor, search top 20, fetch, decrypt, verify
            timings, mismatches, served_top, sheet = [], 0, [], {}
            for rec in progress(queries, desc="user searches (top 20, fetched, decrypted)", unit="query"):
                hits, t = search_image(rec.path, grant, cloud, hasher, k=20)
                timings.append(t)
                served_top.append([(h.id, h.distance) for h in hits])
                for h in hits:
                    if h.image != by_id[h.id].path.read_bytes():
                        mismatches += 1
                if rec.label not in sheet and len(sheet) < SHEET_QUERIES:  # the first query of each class
                    sheet[rec.label] = SheetRow(rec.path.read_bytes(), class_names[rec.label], [
                        SheetHit(h.image, class_names[by_id[h.id].label], h.distance) for h in hits[:SHEET_K]])

        print(f"== 7b. private-ranking mode: sync the sealed code pages, rank all {len(queries)} queries locally")
        with CloudClient(cloud_proc.address, p_grant.reader_token) as cloud, connect_triton() as hasher:
            local = open_local(cloud, p_grant, cache=work / "private.pages")  # learns the mode, syncs every page
            sync = local.last_sync
            # the whole database ranked for every query on this machine, against the server's ranking
            local_results = local.search(q_codes, k=len(database))  # raw codes: the pages hold raw codes
            private_equal = len(local_results) == len(results) and all(
                np.array_equal(a_ids, b_ids) and np.array_equal(a_d, b_d)
                for (a_ids, a_d), (b_ids, b_d) in zip(local_results, results))
            p_timings = []
            for rec, top in zip(queries, served_top):  # the user flow, top 20, fetched and decrypted
                hits, t = search_image(rec.path, p_grant, cloud, hasher, k=20, local=local)
                p_timings.append(t)
                private_equal &= [(h.id, h.distance) for h in hits] == top
                for h in hits:
                    if h.image != by_id[h.id].path.read_bytes():
                        mismatches += 1
        summary["private"] = {"equals_server_ranked": bool(private_equal), "pages": sync.pages_total,
                              "sync_kb": sync.bytes_fetched / 1e3, "sync_ms": sync.seconds * 1e3,
                              "sync_p50_ms": _pct([t.sync_s for t in p_timings], 50),
                              "local_search_p50_ms": _pct([t.search_s for t in p_timings], 50),
                              "end_to_end_p50_ms": _pct([t.total_s for t in p_timings], 50),
                              "end_to_end_p99_ms": _pct([t.total_s for t in p_timings], 99)}
        keys_m = [k for k in offline if k.startswith("P@")] + ["mAP"]
        equal = all(abs(served[k] - offline[k]) < 1e-12 for k in keys_m)
        summary.update(offline={k: offline[k] for k in keys_m}, served=served, served_equals_offline=equal,
                       decrypted_checked=40 * len(queries), decrypt_mismatches=mismatches)
        tr = [t.trapdoor_s for t in timings]
        se = [t.search_s for t in timings]
        e2e = [t.total_s for t in timings]
        summary["latency_ms"] = {"trapdoor_p50": _pct(tr, 50), "trapdoor_p99": _pct(tr, 99),
                                 "search_p50": _pct(se, 50), "search_p99": _pct(se, 99),
                                 "end_to_end_p50": _pct(e2e, 50), "end_to_end_p99": _pct(e2e, 99)}
    finally:
        print("== 8. stop the servers")
        cloud_proc.stop()
        triton.stop()
    summary["wall_seconds"] = time.perf_counter() - t_start
    (work / "demo.json").write_text(json.dumps(summary, indent=2))

    print("\n================ DLHEIR demo results ================")
    print(f"data: {args.data} ({len(database)} database images, {len(queries)} queries, {len(class_names)} classes)")
    print(f"{'':<26}" + "".join(f"{k:>8}" for k in keys_m))
    print(f"{'offline (PyTorch)':<26}" + "".join(f"{offline[k]:>8.4f}" for k in keys_m))
    print(f"{'served (Triton + cloud)':<26}" + "".join(f"{served[k]:>8.4f}" for k in keys_m))
    print(f"served == offline: {'yes' if equal else 'NO'}")
    pv = summary["private"]
    print(f"private mode == server-ranked: {'yes' if pv['equals_server_ranked'] else 'NO'} "
          f"(all {len(queries)} queries, full rankings and top-20 user flow)")
    print(f"decrypted top-20 results checked byte-for-byte: {40 * len(queries)} (both modes), mismatches: {mismatches}")
    u = summary["upload"]
    print(f"upload: {u['images']} images, {u['mb']:.2f} MB, {u['images_per_s']:.1f} images/s, {u['mb_per_s']:.2f} MB/s")
    lat = summary["latency_ms"]
    print(f"latency ms  trapdoor p50 {lat['trapdoor_p50']:.1f} p99 {lat['trapdoor_p99']:.1f} | "
          f"search p50 {lat['search_p50']:.2f} p99 {lat['search_p99']:.2f} | "
          f"end-to-end (trapdoor+search+fetch+decrypt 20) p50 {lat['end_to_end_p50']:.1f} p99 {lat['end_to_end_p99']:.1f}")
    print(f"private mode: {pv['pages']} sealed code pages ({pv['sync_kb']:.1f} KB) synced in {pv['sync_ms']:.1f} ms; "
          f"per query: sync p50 {pv['sync_p50_ms']:.2f} ms | local search p50 {pv['local_search_p50_ms']:.3f} ms | "
          f"end-to-end p50 {pv['end_to_end_p50_ms']:.1f} p99 {pv['end_to_end_p99_ms']:.1f}")
    print(f"wall time {summary['wall_seconds']:.0f}s (training {summary['train_seconds']:.0f}s); written {work / 'demo.json'}")
    picture = contact_sheet(
        work / "demo.png", list(sheet.values()),
        {"offline (PyTorch)": {k: offline[k] for k in keys_m}, "served (Triton + cloud)": {k: served[k] for k in keys_m}},
        {"trapdoor": {"p50": lat["trapdoor_p50"], "p99": lat["trapdoor_p99"]},
         "search": {"p50": lat["search_p50"], "p99": lat["search_p99"]},
         "end to end": {"p50": lat["end_to_end_p50"], "p99": lat["end_to_end_p99"]}},
        f"DLHEIR demo on {args.data}: {cfg['bits']} bits, {cfg['image_size']} px, {cfg['epochs']} epochs; "
        f"top {SHEET_K} decrypted results (green: same class, red: other)")
    print(f"picture: {picture} (queries and their decrypted top {SHEET_K}, right class green, wrong red; "
          "P@k/mAP and latency under them)")
    if args.quick:
        print("next: the full demo (64 px, 6 epochs; its training is most of its time): make demo-full, "
              "or your own photos: the five-minute tour in README.md")
    else:
        print("next: your own photos: the five-minute tour in README.md (dlheir owner upload my_images, "
              "dlheir user search query.jpg)")
    return 0 if equal and pv["equals_server_ranked"] and mismatches == 0 else 1
