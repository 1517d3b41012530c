"""The embedded demo dataset: camera photographs and generated twins of procedural product shots, built offline."""

from app.demo.build import DemoSummary, build_demo_dataset

__all__ = ["DemoSummary", "build_demo_dataset"]
