"""Files between EngineCore and the API server: counters (:mod:`.metrics`) and per-request reports
(:mod:`.report`). The engine writes them, the front end reads them; neither side's code is imported here.
No vLLM import."""
