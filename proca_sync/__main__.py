from proca_sync.cli import main

main()
