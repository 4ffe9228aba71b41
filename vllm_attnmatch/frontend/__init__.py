"""The front end: what runs in the API-server process (and in ``LLM``) before and around the engine.

The ``vllm.general_plugins`` entry point (:mod:`.plugin`), the ``--attnmatch`` serve flag (:mod:`.cli_flag`),
the support matrix (:mod:`.support`), the start-up dry run of the algorithm options (:mod:`.option_check`),
the per-request validator (:mod:`.validation`) and the report endpoint (:mod:`.report_endpoint`). It may
import every other part of the package; none of them imports it (a unit test checks the import graph).
"""
