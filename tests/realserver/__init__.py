"""The real bert-serving-server 1.10.0 for the tests: its Python 3.7 venv, the packaged MiniLM as a TF checkpoint, a launcher."""
