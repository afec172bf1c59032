"""The steps recipes are made of: the lab (lab), the shared run settings (run_config), stages and the
run lifecycle (stages), masked SFT (sft), self-correction rounds (rounds), the PRM stages
(prm_stages), curricula (curriculum), sweep reports (report). The top of the library: recipes/
and tools/ call it; nothing in halluc/ imports them.
"""
