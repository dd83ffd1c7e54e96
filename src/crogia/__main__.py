from crogia.cli import main

main()
