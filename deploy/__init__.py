"""A radfed deployment on real Flower processes: one SuperLink (TLS, SuperNode authentication) and one
SuperNode per hospital. ``python -m deploy --help``; the guide is docs/deployment.md."""
