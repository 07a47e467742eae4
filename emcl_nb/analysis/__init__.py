"""Analysis and reports: the seeded ablation grid and its statistics, what the EM step does
on a block (em_step) with its figures and explorer, the notebooks' figures, the demo, and
the README's generated sections (readme)."""
