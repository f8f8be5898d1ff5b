"""What a run shows: progress lines, the data table, the end-of-run
pictures and closing lines."""
