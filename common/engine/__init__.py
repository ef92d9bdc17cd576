"""The inference engine: sequences, scheduler, sampler, model runner and the engine loop."""
