-- Runs after every apply that changed something: fresh statistics for the planner.
ANALYZE person;
