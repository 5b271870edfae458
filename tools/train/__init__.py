"""Training, export and feature tools of the bundled models (`python -m tools.train.X`)."""
