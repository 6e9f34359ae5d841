"""What one worker does for one cell: build the problem, measure, score."""
