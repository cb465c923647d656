"""ragkit component: eval — scores and compares runs the way the benchmarks' own scripts do.

retrieval (pytrec_eval metrics), protocols (BEIR / BRIGHT / CoIR rules), answers (EM, F1,
yes/no/maybe, ROUGE-L), generation (answer + cache metrics), runs (run folders), trec (run
files), significance (paired tests), compare (two run folders), report (leaderboards).
"""
