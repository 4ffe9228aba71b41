"""What the benchmark suites share: the stamp, texts and corpus, tasks, server calls, scoring, result files,
plots and the plain answers read from results. Nothing here runs a benchmark."""
