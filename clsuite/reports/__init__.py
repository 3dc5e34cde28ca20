"""Reports over run records and saved models: leaderboards, sharpness correlations, loss landscapes, plots."""
