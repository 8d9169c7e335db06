"""Fake neuronx-cc: installed, never imported by vllm_nki_moe."""
