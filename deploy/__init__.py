"""A radfed deployment on real Flower processes: one SuperLink (TLS, SuperNode authentication) and one
SuperNode per hospital. ``radfed deploy --help``; the guide is docs/deployment.md."""
