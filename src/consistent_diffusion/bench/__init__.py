"""The consistency benchmark: declarative suites -> cells (task x method) -> scored series -> report."""
