"""Rate-accuracy evaluation: lwfc points, baselines, reports."""
