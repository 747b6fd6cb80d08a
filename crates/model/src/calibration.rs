//! The texts an int8 model is calibrated on at load ([`crate::bert::Bert::load`]).
//!
//! Calibration only finds which input channels of each Linear layer reach the largest
//! magnitudes. In BERT-family models those channels belong to the model, not to the text
//! (the same four of MiniLM's 384 in every layer, whatever is embedded: measured on
//! English sentences and on variant annotations alike), so a short, fixed, mixed set
//! finds them, and the same model always gets the same channels: int8 vectors are
//! reproducible from one start to the next.
pub const TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps a piece of text to a point in a vector space.",
    "What is the capital of France?",
    "Patients carrying the variant showed reduced enzyme activity and earlier onset.",
    "Streaming record batches through an embedding service keeps memory flat.",
    "x",
    "BRCA1 chr17:43045712 G>A missense_variant p.Arg1699Gln deleterious(0.01) probably_damaging(0.998)",
    "TP53 chr17:7674220 C>T stop_gained c.916C>T p.Arg306Ter",
    "CFTR chr7:117559590 ATCT>A inframe_deletion p.Phe508del pathogenic",
    "RP11-87M18.2 chrX:115097890 CT>C 5_prime_UTR_variant&NMD_transcript_variant",
    "DDX26B chrX:144889348 A>AT intron_variant&NMD_transcript_variant E/K tolerated(0.78) benign(0.004)",
    "rs121913529 KRAS G12D somatic, colorectal adenocarcinoma; allele frequency 0.23",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
    "ERROR 2026-11-28T10:15:00Z request 7f3a failed: deadline exceeded after 30 s",
    "Mitochondrial DNA is inherited from the mother.",
];
