"""Variant texts for model benchmarks: the sample VCF's records rendered by `keel texts`,
then its genes, positions, alleles, consequences and predictions recombined until N texts
(the same recombination as scripts/bench-compact.py, another seed). Standard library only.

    python3 scripts/tools/variant_texts.py KEEL_BINARY N [SEED] > texts.txt
"""
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    binary, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    lines = subprocess.run([binary, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    out = list(dict.fromkeys(lines))[:n]
    seen = set(out)
    fields = [l.split(" ") for l in lines]
    genes = sorted({f[0] for f in fields})
    alleles = sorted({f[2] for f in fields if ">" in f[2]})
    consequences = sorted({f[3] for f in fields if len(f) > 3})
    tails = sorted({" ".join(f[4:]) for f in fields if len(f) > 4})
    rng = random.Random(seed)
    while len(out) < n:
        pos = rng.randrange(1_000_000, 155_000_000)
        tail = rng.choice(tails) if rng.random() < 0.5 else ""
        text = (f"{rng.choice(genes)} chrX:{pos} {rng.choice(alleles)} "
                f"{rng.choice(consequences)} {tail}").strip()
        if text not in seen:
            seen.add(text)
            out.append(text)
    rng.shuffle(out)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
