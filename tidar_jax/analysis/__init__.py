"""Analysis floor: reads compiled programs and the runtime, estimates time and memory; never imported by the
runtime."""
