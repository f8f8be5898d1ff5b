"""What a run shows: progress, the data table, plots and closing lines."""
