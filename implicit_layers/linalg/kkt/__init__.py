"""KKT matrices of QPs: equality-constrained (:mod:`.equality`), with inequalities
(:mod:`.inequality`), and reduced to the inequality multipliers (:mod:`.reduced`)."""
