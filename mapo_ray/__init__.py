"""mapo-ray: RL for vision-language models on Ray, with MAPO advantages."""
