from gaikan.io.model_io import load_detector, read_manifest, save_detector

__all__ = ["load_detector", "read_manifest", "save_detector"]
