from mtp_jax.decoding.cli import main

main()
