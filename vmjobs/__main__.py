from vmjobs.cli import main

main()
