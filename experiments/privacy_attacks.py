"""What a curious client learns from the vectors FCL exchanges: three attacks, without DP and at
given epsilons (README, "What leaves a hospital"; experiments/README.md, issue 25).

A pre-training run (its config, its last checkpoint) gives each sender's momentum encoder and the
global model. For every sender it rebuilds what the other clients receive:

- without DP: every slice of the sender's training volumes embedded by its momentum encoder (the
  paper's ``exchange_source: embed``; the project's ``keys`` sends augmented views of the same
  slices, which can only help less);
- with DP at epsilon: ``rounds`` rounds of the DP payload (one slice per patient and partition,
  embedded by the global model, clipped, Gaussian noise at the noise multiplier the accountant
  gives for that epsilon over those rounds); all rounds pooled, as an attacker keeps them.

The attacks, by a receiver that also holds the global model:

(a) ED/ES re-identification: for each vector of an ED frame, the vectors of ES frames of the same
    partition ranked by cosine; top-1 / top-5: one of them is the same patient's (chance: the
    share of the same patient's ES vectors among the candidates, exactly);
(b) site attribution: a 10-NN vote (cosine) over the vectors of half the patients of every
    client, tags known, names the client of the other half's vectors (chance 1 / clients);
    the tags themselves name the sender: this measures what the vectors alone say of the site
    (in ACDC, a disease group: the diagnosis);
(c) membership: for a candidate patient, its slices embedded by the global model, the mean over
    slices of the best cosine to the sender's vectors of the same partition; AUC of members
    (the sender's training patients) against its held-out patients (never in its training).

    python experiments/privacy_attacks.py --run runs/i25/pretrain/fcl --root $ACDC \
        --cache runs/i25/cache --epsilons 8,2,1 --out runs/i25/attacks.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "experiments"))  # provenance.py

from fcl_lightning.cli import build  # noqa: E402
from fcl_lightning.fcl.partition import volume_slices  # noqa: E402
from fcl_lightning.federation.checkpoint import client_states_of, load_checkpoint, resolve_ckpt_path  # noqa: E402
from fcl_lightning.privacy import accountant  # noqa: E402
from fcl_lightning.privacy.mechanism import (  # noqa: E402
    noise_generator,
    one_per_patient,
    private_features,
    vector_sensitivity,
)


@torch.no_grad()
def embed_all(embed, volumes, S):
    """Every slice of ``volumes``: vectors, partitions, volume index of each."""
    x, p = volume_slices([v.image for v in volumes], S)
    vol = torch.cat([torch.full((v.num_slices,), i) for i, v in enumerate(volumes)])
    vecs = torch.cat([embed(x[i : i + 64]) for i in range(0, len(x), 64)])
    return F.normalize(vecs.float(), dim=1), p, vol


def reid(vecs, parts, patient, frame, ks=(1, 5)):
    """(a): top-k accuracy of linking ED vectors to the same patient's ES vectors, and chance."""
    hits = {k: [] for k in ks}
    chance = {k: [] for k in ks}
    for s in parts.unique().tolist():
        q = torch.nonzero((parts == s) & (frame == 0)).flatten()
        c = torch.nonzero((parts == s) & (frame == 1)).flatten()
        if not len(q) or not len(c):
            continue
        sim = vecs[q] @ vecs[c].T
        for k in ks:
            top = sim.topk(min(k, len(c)), dim=1).indices
            for i, qi in enumerate(q.tolist()):
                m = int((patient[c] == patient[qi]).sum())
                if m == 0:
                    continue  # no ES vector of this patient in the pool: nothing to link
                hits[k].append(float((patient[c[top[i]]] == patient[qi]).any()))
                n, kk = len(c), min(k, len(c))
                chance[k].append(1 - math.comb(n - m, kk) / math.comb(n, kk))
    out = {}
    for k in ks:
        out[f"reid_top{k}"] = sum(hits[k]) / max(1, len(hits[k]))
        out[f"reid_top{k}_chance"] = sum(chance[k]) / max(1, len(chance[k]))
    out["reid_queries"] = len(hits[ks[0]])
    return out


def attribution(vecs, clients, patients, k=10):
    """(b): 10-NN site attribution, trained on half of each client's patients, tested on the rest."""
    half = {p: i % 2 == 0 for i, p in enumerate(sorted(set(patients)))}  # every other patient, by id
    train = torch.tensor([half[p] for p in patients])
    tr, te = torch.nonzero(train).flatten(), torch.nonzero(~train).flatten()
    sim = vecs[te] @ vecs[tr].T
    nn = clients[tr][sim.topk(k, dim=1).indices]
    pred = torch.mode(nn, dim=1).values
    return {"site_acc": float((pred == clients[te]).float().mean()), "site_chance": 1 / len(clients.unique())}


def auc(pos, neg):
    """Probability that a member scores above a non-member (ties count half)."""
    pos, neg = torch.tensor(pos), torch.tensor(neg)
    gt = (pos[:, None] > neg[None, :]).float().mean()
    eq = (pos[:, None] == neg[None, :]).float().mean()
    return float(gt + 0.5 * eq)


def auc_interval(pos, neg, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the AUC (members and non-members resampled separately)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.tensor(pos), torch.tensor(neg)
    vals = []
    for _ in range(n_boot):
        a = pos[torch.randint(len(pos), (len(pos),), generator=g)]
        b = neg[torch.randint(len(neg), (len(neg),), generator=g)]
        vals.append(auc(a.tolist(), b.tolist()))
    vals = torch.tensor(vals)
    return float(vals.quantile(0.025)), float(vals.quantile(0.975))


def membership_score(cand, cand_parts, sent, sent_parts):
    scores = []
    for s in cand_parts.unique().tolist():
        a, b = cand[cand_parts == s], sent[sent_parts == s]
        if len(b):
            scores.append((a @ b.T).max(dim=1).values)
    return float(torch.cat(scores).mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a pre-training run folder (config.yaml, checkpoints/)")
    ap.add_argument("--root", required=True, help="ACDC training folder")
    ap.add_argument("--cache", default=None, help="data.cache_dir (the run's preprocessed volumes)")
    ap.add_argument("--epsilons", default="8,2,1")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the DP runs (default: the run's)")
    ap.add_argument("--out", default=None, help="JSON of the figures")
    args = ap.parse_args(argv)

    run = Path(args.run)
    import tempfile

    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # the fit command's own options, not the config's
        cfg.pop(key, None)
    tmp = Path(tempfile.mkdtemp()) / "config.yaml"
    tmp.write_text(yaml.safe_dump(cfg))
    cli_args = ["--config", str(tmp), f"--data.root={args.root}", "--trainer.logger=false"]
    if args.cache:
        cli_args.append(f"--data.cache_dir={args.cache}")
    cli = build(cli_args)
    module, dm = cli.model, cli.datamodule
    fed = cli.config_init["federation"]
    rounds = args.rounds or fed.rounds
    dm.setup("fit")
    S, C = dm.num_partitions, dm.num_clients
    path = resolve_ckpt_path("last", run)
    ckpt = load_checkpoint(path)
    module.load_global_state(ckpt["global"])
    states = client_states_of(ckpt, run)
    module.eval()
    global_w = {k: v.clone() for k, v in module.global_state().items()}

    # candidates for membership, embedded by the attacker with the global model
    cand = {}
    for c in range(C):
        for role, vols in (("member", dm.train[c]), ("non-member", dm.val[c])):
            for p in sorted({v.record.patient for v in vols}):
                pv = [v for v in vols if v.record.patient == p]
                e, parts, _ = embed_all(module.embed, pv, S)
                cand[(c, p)] = (role, e, parts)

    def clean_payload(c):
        module.load_global_state(global_w)
        module.load_client_state(states[c])
        vols = dm.train[c]
        e, parts, vol = embed_all(module.embed_keys, vols, S)  # the sender's momentum encoder
        patient = torch.tensor([sorted({v.record.patient for v in vols}).index(vols[i].record.patient) for i in vol])
        frame = torch.tensor([int(vols[i].record.frame == "ES") for i in vol])
        names = [vols[i].record.patient for i in vol]
        return e, parts, patient, frame, names

    def dp_payload(c, sigma):
        module.load_global_state(global_w)
        vols = dm.train[c]
        names_sorted = sorted({v.record.patient for v in vols})
        vec, parts, patient, frame, names = [], [], [], [], []
        for r in range(rounds):
            # the payload of round r; which slice went out is known to the harness, not the attacker
            sample_g = torch.Generator().manual_seed(1000 * c + r)
            x, p = volume_slices([v.image for v in vols], S)
            vol_of = torch.cat([torch.full((v.num_slices,), i) for i, v in enumerate(vols)])
            who = torch.tensor([names_sorted.index(vols[i].record.patient) for i in vol_of])
            order = one_per_patient(p, who, S, fed.exchange_per_partition, sample_g)
            payload = private_features(
                module.embed,
                [v.image for v in vols],
                [v.record.patient for v in vols],
                S,
                c,
                fed.exchange_per_partition,
                1.0,
                sigma,
                torch.Generator().manual_seed(1000 * c + r),
                noise_generator(7 + c, r, 0),
            )
            vec.append(F.normalize(payload.vectors, dim=1))
            parts.append(payload.partitions)
            patient.append(who[order])
            frame.append(torch.tensor([int(vols[int(vol_of[i])].record.frame == "ES") for i in order]))
            names += [vols[int(vol_of[i])].record.patient for i in order]
        return torch.cat(vec), torch.cat(parts), torch.cat(patient), torch.cat(frame), names

    settings = [("no DP", None)] + [(f"epsilon {float(e):g}", float(e)) for e in args.epsilons.split(",")]
    results = []
    for label, eps in settings:
        if eps is None:
            sigma, z = None, None
            payloads = {c: clean_payload(c) for c in range(C)}
        else:
            z = accountant.calibrate(eps, args.delta, rounds)
            sigma = z * vector_sensitivity(1.0, "patient", S)
            payloads = {c: dp_payload(c, sigma) for c in range(C)}
        re = [reid(*payloads[c][:4]) for c in range(C)]
        row = {"setting": label, "epsilon": eps, "noise_multiplier": z, "sigma": sigma, "rounds": rounds}
        for key in re[0]:
            row[key] = sum(r[key] for r in re) / C
        allv = torch.cat([payloads[c][0] for c in range(C)])
        allc = torch.cat([torch.full((len(payloads[c][0]),), c) for c in range(C)])
        alln = [n for c in range(C) for n in payloads[c][4]]
        row.update(attribution(allv, allc, alln))
        mem, non = [], []
        for (c, _patient), (role, e, parts) in cand.items():
            sc = membership_score(e, parts, payloads[c][0], payloads[c][1])
            (mem if role == "member" else non).append(sc)
        lo, hi = auc_interval(mem, non)
        row.update({"membership_auc": auc(mem, non), "membership_auc_ci": [lo, hi]})
        row.update({"members": len(mem), "non_members": len(non)})
        row["vectors_per_client"] = sum(len(payloads[c][0]) for c in range(C)) / C
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        import provenance

        Path(args.out).write_text(json.dumps(results, indent=2))
        # beside the JSON, for privacy_utility.py's results folder (it reads this call from there)
        provenance.append(Path(args.out).parent, provenance.record(data=f"ACDC at {args.root}"))
    print("\n| setting | re-id top-1 (chance) | top-5 (chance) | site (chance) | membership AUC [95% CI] |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']} | {r['reid_top1']:.3f} ({r['reid_top1_chance']:.3f}) | {r['reid_top5']:.3f} "
            f"({r['reid_top5_chance']:.3f}) | {r['site_acc']:.3f} ({r['site_chance']:.3f}) | {r['membership_auc']:.3f} "
            f"[{r['membership_auc_ci'][0]:.2f}, {r['membership_auc_ci'][1]:.2f}] |"
        )


if __name__ == "__main__":
    main()
