from hadron.cli import main

main()
